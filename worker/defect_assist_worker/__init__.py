"""RQ worker of defect-assist: the retrain job, its triggers and queue, and the project's embedded Redis.

Modules, bottom up: ``redis_server`` (an embedded redis-server), ``queues`` (names, connections),
``triggers`` (one job per project, follow-ups, Label Studio webhooks), ``jobs`` (the job body, which
calls :func:`defect_assist.training.pipeline.train_and_publish`), ``status`` (what ``jobs`` shows),
``worker`` (spawn-based rq worker), ``routes`` (``POST /retrain``, ``GET /jobs``), ``commands`` (CLI).
"""

"""Queue names and connections (plain names, as rq-dashboard and ``rq info`` list them)."""

from __future__ import annotations

import redis
from rq import Queue

from defect_assist.core.settings import Settings
from defect_assist_worker.redis_server import connect

RETRAIN_QUEUE = "defect-assist-retrain"
QUEUES = (RETRAIN_QUEUE,)
KEY_PREFIX = "defect-assist"


def project_key(project: str, suffix: str) -> str:
    """Redis key of per-project trigger state, e.g. ``defect-assist:project:3:retrain``."""
    return f"{KEY_PREFIX}:project:{project}:{suffix}"


def get_connection(settings: Settings | None = None, start: bool = False) -> redis.Redis:
    """A client for ``REDIS_URL`` or the running embedded Redis; ``start`` starts it when it is not running.

    Only the worker starts the embedded server: a web process (``GET /jobs``, a webhook) never does.
    """
    return connect(settings, start=start)


def retrain_queue(connection: redis.Redis | None = None) -> Queue:
    return Queue(RETRAIN_QUEUE, connection=connection or get_connection())

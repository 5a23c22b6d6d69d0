"""``defect-assist worker``: rq workers that never fork after CUDA init.

The worker process itself never imports torch. Each job runs in a fresh work horse started with
``posix_spawn`` (rq's :class:`~rq.worker.SpawnWorker`), which picks the device (CUDA when present,
else CPU; ``--device``/``DEVICE`` overrides) and dies with its worker (``PR_SET_PDEATHSIG``).
On start the worker re-queues jobs abandoned by a worker that died on this host (``kill -9``, OOM),
so they are re-run at once instead of after rq's heartbeat expiry.
"""

from __future__ import annotations

import logging
import os
import socket

import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.worker import SpawnWorker, Worker

from defect_assist_worker.queues import QUEUES, get_connection
from defect_assist_worker.redis_server import pid_alive

logger = logging.getLogger(__name__)


def _worker_dead(connection: redis.Redis, worker_name: str | None) -> bool:
    """True when the worker is gone: no key, or registered on this host with a dead pid."""
    if not worker_name:
        return True
    worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + worker_name, connection=connection)
    if worker is None:
        return True
    if worker.hostname == socket.gethostname() and worker.pid and not pid_alive(worker.pid):
        worker.register_death()
        return True
    return False


def _forget_executions(connection: redis.Redis, registry: StartedJobRegistry, job_id: str) -> None:
    """Drop the job's entries (``<job id>:<execution id>``) from the started registry.

    rq's ``remove_executions`` reads each execution's hash first and raises when one has expired, which
    is what a worker killed long ago leaves behind; the registry's own members are enough here.
    """
    members = [m for m in connection.zrange(registry.key, 0, -1) if m.decode().startswith(f"{job_id}:")]
    if members:
        connection.zrem(registry.key, *members)


def reap_dead_workers(connection: redis.Redis) -> list[str]:
    """Mark workers registered on this host whose process is gone as dead; returns their names.

    A worker killed with ``kill -9`` leaves its key for rq's TTL (minutes); a new worker of the same
    name (the stack's ``stack-worker``) would refuse to start until then.
    """
    reaped = []
    for worker in Worker.all(connection=connection):
        if worker.hostname == socket.gethostname() and worker.pid and not pid_alive(worker.pid):
            worker.register_death()
            reaped.append(worker.name)
    return reaped


def recover_abandoned(connection: redis.Redis, queue_names: tuple[str, ...] = QUEUES) -> list[str]:
    """Re-queue (at the front) started jobs whose worker died; returns their ids."""
    recovered = []
    reap_dead_workers(connection)
    for name in queue_names:
        queue = Queue(name, connection=connection)
        registry = StartedJobRegistry(queue=queue)
        for job_id in registry.get_job_ids(cleanup=False):
            try:
                job = Job.fetch(job_id, connection=connection)
            except NoSuchJobError:  # a vanished job needs no recovery
                continue
            if job.get_status() != JobStatus.STARTED or not _worker_dead(connection, job.worker_name):
                continue
            _forget_executions(connection, registry, job.id)
            job.meta["recovered"] = job.meta.get("recovered", 0) + 1
            job.meta["stage"] = "requeued after worker death"
            job.save_meta()
            queue.enqueue_job(job, at_front=True)
            logger.warning("re-queued job %s abandoned by dead worker %s", job.id, job.worker_name)
            recovered.append(job.id)
    return recovered


def run_worker(
    burst: bool = False,
    device: str | None = None,
    name: str | None = None,
    queue_names: tuple[str, ...] = QUEUES,
    logging_level: str = "INFO",
) -> None:
    """Run one spawn-based rq worker (with rq's scheduler for delayed and retried jobs)."""
    if device:
        os.environ["DEVICE"] = device  # the horses read it through the settings
    connection = get_connection(start=True)
    recover_abandoned(connection, queue_names)
    worker = SpawnWorker(
        [Queue(q, connection=connection) for q in queue_names],
        connection=connection,
        name=name,
        maintenance_interval=60,
    )
    worker.work(burst=burst, with_scheduler=True, logging_level=logging_level)

"""Job visibility: state, stage, %, ETA and failure reason of retrain jobs (CLI and HTTP)."""

from __future__ import annotations

from typing import Any

import redis
from rq import Queue
from rq.job import Job
from rq.registry import (
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)

from defect_assist_worker.queues import QUEUES


def describe_job(job: Job) -> dict[str, Any]:
    meta = job.meta or {}
    status = job.get_status(refresh=False)
    info: dict[str, Any] = {
        "id": job.id,
        "status": str(status.value if hasattr(status, "value") else status),
        "project": meta.get("project") or (job.kwargs or {}).get("project"),
        "reason": meta.get("reason"),
        "stage": meta.get("stage"),
        "percent": meta.get("percent"),
        "eta_s": meta.get("eta_s"),
        "mode": meta.get("mode"),
        "version": meta.get("version"),
        "made_current": meta.get("current"),  # False: kept as a candidate (check_reason says why)
        "current": meta.get("current"),  # whether the version is current *now* (see list_jobs)
        "check_reason": meta.get("check_reason"),
        "error": meta.get("error"),
        "enqueued_at": job.enqueued_at.isoformat() if job.enqueued_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "ended_at": job.ended_at.isoformat() if job.ended_at else None,
        "retries_left": job.retries_left,
        "recovered": meta.get("recovered", 0),
    }
    if str(info["status"]) == "failed":
        result = job.latest_result()
        info["failure"] = (result.exc_string or "")[-2000:] if result is not None else None
        if meta.get("refused"):  # a refused retrain: its reason, not a traceback
            info["failure"] = meta.get("error")
    elif str(info["status"]) == "finished":
        info["result"] = job.return_value()
    return info


def _current_versions(projects: set[str]) -> dict[str, str | None]:
    """The store's current version of each project (what serves now)."""
    from defect_assist.core.settings import get_settings
    from defect_assist.core.store import ModelStore

    store = ModelStore(get_settings().model_dir)
    return {project: store.current_version(project) for project in projects}


def list_jobs(connection: redis.Redis, project: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Jobs of the project queues (queued, scheduled, started, deferred, finished, failed), newest first."""
    ids: list[str] = []
    for name in QUEUES:
        queue = Queue(name, connection=connection)
        ids += queue.get_job_ids()
        for registry in (
            StartedJobRegistry,
            ScheduledJobRegistry,
            DeferredJobRegistry,
            FinishedJobRegistry,
            FailedJobRegistry,
        ):
            ids += registry(queue=queue).get_job_ids()
    jobs = [job for job in Job.fetch_many(list(dict.fromkeys(ids)), connection=connection) if job is not None]
    described = [describe_job(job) for job in jobs]
    if project is not None:
        described = [d for d in described if str(d["project"]) == str(project)]
    serving = _current_versions({str(d["project"]) for d in described if d["version"]})
    for info in described:
        if info["version"] and info["made_current"] is not None:  # a later version or a rollback moves it
            info["current"] = serving.get(str(info["project"])) == info["version"]
    described.sort(key=lambda d: d["enqueued_at"] or d["started_at"] or "", reverse=True)
    return described[:limit]

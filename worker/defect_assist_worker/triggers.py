"""Retrain triggers: Label Studio webhooks, auto-retrain after N new normals, CLI and HTTP requests.

One job per project at a time. Per project a Redis hash ``defect-assist:project:<p>:retrain`` holds
the active job id and at most one pending follow-up:

- no active job (or it finished/failed)  → enqueue a job;
- the active job is still queued/scheduled → coalesce (it will read the newest annotations anyway);
- the active job is running               → record one follow-up (later requests merge into it);
- when a job ends it enqueues the pending follow-up, so two jobs of a project never overlap.

Auto-retrain counts distinct tasks annotated as normal since the last job started; at N
(``AUTO_RETRAIN_AFTER``) it schedules a job ``AUTO_RETRAIN_DEBOUNCE`` seconds later (pushed back by
further annotations), and no sooner than ``AUTO_RETRAIN_COOLDOWN`` after the previous auto-retrain.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from defect_assist.core.settings import get_settings
from defect_assist.label_studio.annotations import classify_annotation
from defect_assist_worker.queues import RETRAIN_QUEUE, get_connection, project_key

logger = logging.getLogger(__name__)

JOB_FUNCTION = "defect_assist_worker.jobs.retrain"
PENDING = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED}
RESULT_TTL = 7 * 24 * 3600
FAILURE_TTL = 30 * 24 * 3600


def retry_policy(intervals: str) -> Retry | None:
    """rq's retry of a job that found Label Studio unreachable: one retry per interval (seconds)."""
    seconds = [max(0, int(float(part))) for part in intervals.split(",") if part.strip()]
    return Retry(max=len(seconds), interval=seconds) if seconds else None


def _state_key(project: str) -> str:
    return project_key(project, "retrain")


def _lock(connection: redis.Redis, project: str):
    return connection.lock(project_key(project, "lock"), timeout=30, blocking_timeout=30)


def _fetch(connection: redis.Redis, job_id: str | None) -> Job | None:
    if not job_id:
        return None
    try:
        return Job.fetch(job_id, connection=connection)
    except NoSuchJobError:
        return None


def _enqueue(
    connection: redis.Redis,
    project: str,
    reason: str,
    mode: str | None,
    images: list[str] | None,
    options: dict[str, Any] | None,
    delay: float = 0.0,
    auto: bool = False,
) -> Job:
    queue = Queue(RETRAIN_QUEUE, connection=connection)
    common: dict[str, Any] = {
        "kwargs": {"project": project, "reason": reason, "mode": mode, "images": images, "options": options},
        "job_timeout": get_settings().retrain_job_timeout,
        "result_ttl": RESULT_TTL,
        "failure_ttl": FAILURE_TTL,
        "retry": retry_policy(get_settings().retrain_retry_intervals),
        "description": f"retrain project {project} ({reason})",
        "meta": {
            "project": project,
            "reason": reason,
            "auto": auto,
            "stage": "queued",
            "percent": 0.0,
            "requested_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        },
    }
    if delay > 0:
        return queue.enqueue_in(timedelta(seconds=delay), JOB_FUNCTION, **common)
    return queue.enqueue(JOB_FUNCTION, **common)


def request_retrain(
    project: str | int,
    reason: str = "manual",
    *,
    mode: str | None = None,
    images: list[str] | None = None,
    options: dict[str, Any] | None = None,
    delay: float = 0.0,
    auto: bool = False,
    connection: redis.Redis | None = None,
) -> dict[str, Any]:
    """Ask for a retrain of ``project``; returns ``{"status", "job_id", "project"}`` at once.

    ``status`` is ``queued`` (a new job), ``coalesced`` (a job not yet started will cover it),
    ``follow-up scheduled`` (runs after the running job) or ``follow-up already scheduled``.
    """
    project = str(project)
    connection = connection or get_connection()
    key = _state_key(project)
    with _lock(connection, project):
        state = {k.decode(): v.decode() for k, v in connection.hgetall(key).items()}
        active = _fetch(connection, state.get("job_id"))
        if active is not None and state.get("finished") == active.id:
            active = None  # its training is over (only rq's bookkeeping remains)
        status = active.get_status() if active else None
        if active is not None and status in PENDING:
            if auto and status == JobStatus.SCHEDULED and active.meta.get("auto"):
                Queue(RETRAIN_QUEUE, connection=connection).schedule_job(
                    active, datetime.now(UTC) + timedelta(seconds=delay)
                )  # debounce: push the pending auto-retrain back
            return {"status": "coalesced", "job_id": active.id, "project": project}
        if active is not None and status == JobStatus.STARTED:
            if state.get("followup"):
                return {"status": "follow-up already scheduled", "job_id": active.id, "project": project}
            connection.hset(
                key,
                mapping={
                    "followup": json.dumps(
                        {"reason": reason, "mode": mode, "images": images, "options": options}
                    )
                },
            )
            return {"status": "follow-up scheduled", "job_id": active.id, "project": project}
        job = _enqueue(connection, project, reason, mode, images, options, delay=delay, auto=auto)
        connection.hset(key, mapping={"job_id": job.id})
        connection.hdel(key, "followup")
        return {"status": "queued", "job_id": job.id, "project": project, "delay_s": delay}


def job_started(project: str, job_id: str, connection: redis.Redis) -> None:
    """Called by the job when it starts: it is the active one; the new-normal count restarts."""
    with _lock(connection, project):
        connection.hset(_state_key(project), mapping={"job_id": job_id, "started_at": time.time()})
        connection.hdel(_state_key(project), "finished")
        connection.delete(project_key(project, "new_normals"))


def job_finished(project: str, job_id: str, connection: redis.Redis) -> Job | None:
    """Called by the job when it ends (done or failed): enqueue the pending follow-up, if any."""
    key = _state_key(project)
    with _lock(connection, project):
        state = {k.decode(): v.decode() for k, v in connection.hgetall(key).items()}
        if state.get("job_id") != job_id:
            return None
        if not state.get("followup"):
            connection.hset(key, mapping={"finished": job_id})
            return None
        request = json.loads(state["followup"])
        job = _enqueue(
            connection,
            project,
            f"follow-up: {request['reason']}",
            request["mode"],
            request["images"],
            request["options"],
        )
        connection.hset(key, mapping={"job_id": job.id})
        connection.hdel(key, "followup")
        return job


def _project_of(payload: dict[str, Any]) -> str | None:
    project = payload.get("project")
    if isinstance(project, dict):
        project = project.get("id")
    if project is None and isinstance(payload.get("task"), dict):
        project = payload["task"].get("project")
    if project is None and isinstance(payload.get("annotation"), dict):
        project = payload["annotation"].get("project")
    return None if project is None else str(project)


def count_normal_annotation(
    project: str, payload: dict[str, Any], connection: redis.Redis
) -> tuple[bool, int]:
    """Count the event's task as a new normal (or drop it if relabeled); ``(normal, count)``."""
    annotation = payload.get("annotation") or {}
    task = payload.get("task") or {}
    task_id = task.get("id") or annotation.get("task")
    key = project_key(project, "new_normals")
    verdict, _, _ = classify_annotation(annotation.get("result") or [])
    normal = verdict == "normal" and not annotation.get("was_cancelled")
    if task_id is not None:
        if normal:
            connection.sadd(key, str(task_id))
        else:
            connection.srem(key, str(task_id))
    return normal, int(connection.scard(key))


def handle_webhook_event(payload: dict[str, Any], connection: redis.Redis | None = None) -> dict[str, Any]:
    """Handle one Label Studio webhook (fast: counts and enqueues, never trains)."""
    action = str(payload.get("action", ""))
    project = _project_of(payload)
    if project is None:
        return {"status": "ignored", "action": action, "why": "no project in payload"}
    connection = connection or get_connection()
    if action == "START_TRAINING":
        return {"action": action, **request_retrain(project, "START_TRAINING", connection=connection)}
    if action in {"ANNOTATION_CREATED", "ANNOTATION_UPDATED"}:
        settings = get_settings()
        normal, count = count_normal_annotation(project, payload, connection)
        answer: dict[str, Any] = {
            "action": action,
            "project": project,
            "normal": normal,
            "new_normals": count,
        }
        if settings.auto_retrain_after > 0 and count >= settings.auto_retrain_after:
            last = connection.get(project_key(project, "last_auto_at"))
            cooldown_left = float(last) + settings.auto_retrain_cooldown - time.time() if last else 0.0
            delay = max(settings.auto_retrain_debounce, cooldown_left, 0.0)
            answer |= request_retrain(
                project, f"{count} new normal annotations", delay=delay, auto=True, connection=connection
            )
            if answer["status"] == "queued":
                connection.set(project_key(project, "last_auto_at"), time.time() + delay)
        return answer
    return {"status": "ignored", "action": action, "project": project}


def project_state(project: str | int, connection: redis.Redis | None = None) -> dict[str, Any]:
    """Active job, pending follow-up and new-normal count of a project."""
    connection = connection or get_connection()
    project = str(project)
    state = {k.decode(): v.decode() for k, v in connection.hgetall(_state_key(project)).items()}
    return {
        "project": project,
        "job_id": state.get("job_id"),
        "followup": json.loads(state["followup"]) if state.get("followup") else None,
        "new_normals": int(connection.scard(project_key(project, "new_normals"))),
    }

"""RQ worker of defect-assist: retraining jobs, triggers and the project's embedded Redis."""

from __future__ import annotations

from typing import Any


def enqueue_retrain(project: str | int, images: list[str] | None = None, **kwargs: Any):
    """Request a retrain of ``project`` (one job per project, at most one follow-up); returns the rq job."""
    from defect_assist_worker.triggers import enqueue_retrain as _enqueue

    return _enqueue(project, images=images, **kwargs)


def handle_webhook_event(payload: dict[str, Any]) -> dict[str, Any]:
    """Label Studio webhook → retrain request / normal-annotation count (fast, never trains)."""
    from defect_assist_worker.triggers import handle_webhook_event as _handle

    return _handle(payload)


__all__ = ["enqueue_retrain", "handle_webhook_event"]

"""Retrain requests from the FiftyOne plugin: through the worker's queue when installed.

``defect_assist_worker`` (the RQ worker package) is used when it offers ``enqueue_retrain``; the
request then returns the job id at once. Without it the retrain runs right here (the plugin's
operator is delegated, so this is off the App's request path): fit a new model of the current
version's kind and options on the given normal images and publish it to the model store.
"""

from __future__ import annotations

from typing import Any


def request_retrain(project: str, images: list[str], use_queue: bool = True) -> dict[str, Any]:
    """Enqueue (or, without a worker package or with ``use_queue=False``, run) a retrain of ``project``."""
    enqueue = None
    if use_queue:
        try:
            import defect_assist_worker as worker

            enqueue = getattr(worker, "enqueue_retrain", None)
        except ImportError:
            enqueue = None
    if enqueue is not None:
        job = enqueue(project, images=images or None)
        return {"queued": True, "job_id": getattr(job, "id", str(job)), "images": len(images)}

    from defect_assist.models import create_model
    from defect_assist.settings import get_settings
    from defect_assist.store import ModelStore

    if not images:
        raise ValueError("no normal training images in the view and no worker queue installed")
    settings = get_settings()
    store = ModelStore(settings.model_dir)
    current = store.current(project)
    kind = current.kind if current else settings.model_kind
    config = dict(current.metadata.get("config", {})) if current else {}
    model = create_model(kind, device=settings.device, **config)
    report = model.fit(images)
    info = store.publish(project, model)
    return {"queued": False, "version": info.version, "trained_on": report.n_train + report.n_holdout}

"""The rq job of a retrain: report progress into the job, run the one training path, keep the outcome.

Stages (each reported in ``job.meta`` as ``stage``, ``percent``, ``eta_s``): ``fetch`` and
``download`` (the project's annotations and images from Label Studio, see
:mod:`defect_assist.training.label_studio_data`), ``reference``, ``train``, ``evaluate``, ``check``
and ``publish`` (:func:`defect_assist.training.pipeline.train_and_publish`). The result says whether
the new version became ``current`` or is a candidate, and why. Label Studio being unreachable is
transient (rq ``Retry`` with backoff); other errors fail the job at once with their reason kept in
the failed registry; a refused retrain (too few normals) fails with its reason as ``error`` and
``failure`` (``refused`` in the job's meta).
"""

from __future__ import annotations

import ctypes
import os
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rq import get_current_job

from defect_assist.core.settings import get_settings
from defect_assist.label_studio.client import LabelStudioUnavailable
from defect_assist.training.label_studio_data import TrainingSet, collect_label_studio
from defect_assist.training.pipeline import train_and_publish
from defect_assist.training.progress import TrainingProgress
from defect_assist.training.training_set import TrainingRefused
from defect_assist_worker.triggers import job_finished, job_started

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (LabelStudioUnavailable,)


def die_with_parent() -> None:
    """Make this process get SIGKILL when its parent (the rq worker) dies: no orphaned training."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before prctl
        os._exit(1)


class JobProgress(TrainingProgress):
    """Training progress stored in the current rq job's meta (read by ``jobs`` and ``GET /jobs``)."""

    def __init__(self, job: Any = None, min_interval: float = 0.5) -> None:
        super().__init__(min_interval)
        self.job = job

    def report(self, facts: dict[str, Any]) -> None:
        super().report(facts)
        if self.job is not None:
            self.job.meta.update(facts)
            self.job.save_meta()


def retrain(
    project: str | int,
    reason: str = "manual",
    mode: str | None = None,
    images: list[str] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The rq job body. ``images`` (local normal images) bypasses Label Studio (FiftyOne, tests)."""

    project = str(project)
    job = get_current_job()
    if job is not None:
        die_with_parent()
    settings = get_settings()
    progress = JobProgress(job)
    started_at = datetime.now(UTC).isoformat(timespec="milliseconds")
    progress.set(
        project=project,
        reason=reason,
        stage="starting",
        percent=0.0,
        started_at=started_at,
        pid=os.getpid(),
        attempt=int(job.meta.get("attempt", 0) if job else 0) + 1,
    )
    transient = False
    try:
        if job is not None:
            job_started(project, job.id, job.connection)
        if images:
            data = TrainingSet(normals=[Path(p) for p in images], source="images")
        else:
            data = collect_label_studio(project, settings, progress)
        result = train_and_publish(
            project,
            data.normals,
            data.anomalies,
            settings=settings,
            mode=mode or settings.retrain_mode,
            options={**settings.model_options, **(options or {})},
            progress=progress,
            extra={"source": data.source, "reason": reason, "job_id": job.id if job else None},
        )
        result |= {
            "reason": reason,
            "source": data.source,
            "n_tasks": data.n_tasks,
            "downloaded": data.downloaded,
            "started_at": started_at,
            "finished_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        progress.set(
            stage="done",
            percent=100.0,
            eta_s=0.0,
            version=result["version"],
            mode=result["mode"],
            current=result["current"],
            check_reason=result["check_reason"],
            finished_at=result["finished_at"],
        )
        return result
    except TrainingRefused as error:
        if job is not None:
            job.retries_left = 0
        progress.set(stage="refused", refused=True, error=str(error))
        raise
    except TRANSIENT_ERRORS as error:
        transient = bool(job is not None and job.retries_left)
        progress.set(stage="waiting-retry" if transient else "failed", error=str(error))
        raise
    except Exception as error:
        if job is not None:
            job.retries_left = 0  # not transient: fail now, keep the reason
        progress.set(stage="failed", error=f"{type(error).__name__}: {error}")
        raise
    finally:
        if job is not None and not transient:
            job_finished(project, job.id, job.connection)

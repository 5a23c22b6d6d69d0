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
import logging
import os
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rq import get_current_job

from defect_assist.core.settings import get_settings
from defect_assist.label_studio.client import LabelStudioClient, LabelStudioError, LabelStudioUnavailable
from defect_assist.training.label_studio_data import TrainingSet, collect_label_studio
from defect_assist.training.pipeline import train_and_publish
from defect_assist.training.progress import TrainingProgress
from defect_assist.training.training_set import TrainingRefused
from defect_assist_worker.triggers import job_finished, job_started

logger = logging.getLogger(__name__)

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
    """Training progress stored in the current rq job's meta (read by ``jobs`` and ``GET /jobs``), and
    shown on the project's model card in Label Studio when there is one (:class:`ModelCard`)."""

    def __init__(self, job: Any = None, min_interval: float = 0.5, card: ModelCard | None = None) -> None:
        super().__init__(min_interval)
        self.job = job
        self.card = card

    def report(self, facts: dict[str, Any]) -> None:
        super().report(facts)
        if self.job is not None:
            self.job.meta.update(facts)
            self.job.save_meta()
        if self.card is not None and "stage" in facts:
            self.card.progress(str(facts["stage"]), float(self.facts.get("percent") or 0.0))


class ModelCard:
    """The retrain's progress in the title of the project's ML backend card in Label Studio (LS's
    *Start training* dialog shows nothing back): ``defect-assist · serving v0002 · retrain 3f2a…: train 45%``.

    Written on each stage change and every 20 %; Label Studio being unreachable never fails the job.
    """

    def __init__(self, project: str, job_id: str, settings: Any) -> None:
        from defect_assist.core.store import ModelStore

        self.project, self.job = project, job_id[:8]
        self.store = ModelStore(settings.model_dir)
        self.client = LabelStudioClient.from_settings(settings)
        self.last: tuple[str, int] | None = None

    @classmethod
    def for_project(cls, project: str, job: Any, settings: Any) -> ModelCard | None:
        if job is None or not project.isdigit() or not settings.label_studio_api_key:
            return None
        return cls(project, job.id, settings)

    def progress(self, stage: str, percent: float) -> None:
        step = (stage, int(percent // 20))
        if step != self.last:
            self.last = step
            self.show(f"retrain {self.job}: {stage} {percent:.0f}%")

    def show(self, activity: str) -> None:
        from defect_assist.label_studio.version_sync import set_activity

        versions = [v.version for v in self.store.versions(self.project)]
        try:
            set_activity(
                self.client, self.project, self.store.current_version(self.project), activity, versions
            )
        except LabelStudioError as error:
            logger.info("model card of project %s not updated: %s", self.project, error)

    def outcome(self, result: dict[str, Any] | None, error: str | None = None) -> None:
        if error is not None:
            self.show(f"retrain {self.job} failed: {error[:120]}")
        elif result is not None and not result.get("current"):
            self.show(f"candidate {result['version']} kept: {str(result.get('check_reason'))[:120]}")
        else:
            self.show("")  # the new version serves: the title names it
        self.client.close()


def published_by_job(project: str, job_id: str, settings: Any) -> dict[str, Any] | None:
    """The version this job already published, if any: a job publishes at most once, so a job re-run
    after its worker died past the publish step (or the whole stack was killed) trains nothing again."""
    from defect_assist.core.store import ModelStore

    for info in reversed(ModelStore(settings.model_dir).versions(project)):
        if (info.metadata.get("extra") or {}).get("job_id") == job_id:
            return {
                "project": project,
                "version": info.version,
                "current": info.is_current,
                "status": info.status,
                "check_reason": (info.metadata.get("extra") or {}).get("check", {}).get("reason"),
                "already_published": True,
            }
    return None


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
    card = None if images else ModelCard.for_project(project, job, settings)
    progress = JobProgress(job, card=card)
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
            published = published_by_job(project, job.id, settings)
            if published is not None:  # re-run after a kill between publish and the job's end
                progress.set(stage="done", percent=100.0, eta_s=0.0, **published)
                return published
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
            "skipped_images": data.skipped,
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
        if card is not None:
            card.outcome(result)
        return result
    except TrainingRefused as error:
        if job is not None:
            job.retries_left = 0
        progress.set(stage="refused", refused=True, error=str(error))
        if card is not None:
            card.outcome(None, f"refused: {error}")
        raise
    except TRANSIENT_ERRORS as error:
        transient = bool(job is not None and job.retries_left)
        if transient:
            progress.set(stage="waiting-retry", error=str(error))
            raise
        attempts = int(progress.facts.get("attempt") or 1)
        reason = f"{error} (gave up after {attempts} attempt{'s' if attempts > 1 else ''})"
        progress.set(stage="failed", error=reason)
        if card is not None:
            card.outcome(None, reason)
        raise
    except Exception as error:
        if job is not None:
            job.retries_left = 0  # not transient: fail now, keep the reason
        progress.set(stage="failed", error=f"{type(error).__name__}: {error}")
        if card is not None:
            card.outcome(None, f"{type(error).__name__}: {error}")
        raise
    finally:
        if job is not None and not transient:
            job_finished(project, job.id, job.connection)

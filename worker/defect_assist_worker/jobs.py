"""The retrain job: Label Studio annotations → training set → model → evaluation → atomic publish.

Stages (each reported in ``job.meta`` as ``stage``, ``percent``, ``eta_s``):

1. ``fetch``     — export the project's annotated tasks; split normals (verdict normal, or no defect
                   region) from labeled anomalies (with brush masks).
2. ``download``  — images into a content-addressed cache (``CACHE_DIR/images/<sha256>``), each URL once.
3. ``train``     — incremental PatchCore update (new normals added to the memory bank) when the
                   current version's training set is a subset of today's normals, else a full fit.
4. ``evaluate``  — with labeled anomalies: image/pixel AUROC against held-out normals, and the
                   thresholds re-calibrated F1-optimally on them (masks for the pixel threshold).
5. ``publish``   — :meth:`ModelStore.publish` (temp dir → rename → pointer); the backend hot-swaps.

Label Studio being unreachable is transient (rq ``Retry`` with backoff); other errors fail the job
at once with their reason kept in the failed registry.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from defect_assist_worker.label_studio_export import LabelStudioExport, LabelStudioUnavailable, labeled_images

logger = logging.getLogger(__name__)

# Stage → (start %, end %) of the overall progress bar.
STAGES: dict[str, tuple[float, float]] = {
    "fetch": (0, 5),
    "download": (5, 20),
    "train": (20, 85),
    "calibrate": (20, 85),
    "features": (20, 60),
    "coreset": (60, 85),
    "evaluate": (85, 95),
    "publish": (95, 100),
}
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


class JobProgress:
    """``(stage, done, total)`` callback writing stage, % and ETA into the current rq job's meta."""

    def __init__(self, job: Any = None, min_interval: float = 0.5) -> None:
        self.job = job
        self.min_interval = min_interval
        self.started = time.monotonic()
        self.last_save = 0.0
        self.percent = 0.0

    def set(self, **meta: Any) -> None:
        if self.job is not None:
            self.job.meta.update(meta)
            self.job.save_meta()

    def __call__(self, stage: str, done: int, total: int) -> None:
        low, high = STAGES.get(stage, (self.percent, self.percent))
        fraction = done / total if total else 1.0
        self.percent = max(self.percent, low + (high - low) * min(fraction, 1.0))
        elapsed = time.monotonic() - self.started
        eta = elapsed * (100 - self.percent) / self.percent if self.percent > 1 else None
        now = time.monotonic()
        if self.job is not None and (now - self.last_save >= self.min_interval or done >= total):
            self.last_save = now
            self.set(
                stage=stage,
                stage_done=done,
                stage_total=total,
                percent=round(self.percent, 1),
                eta_s=None if eta is None else round(eta, 1),
                elapsed_s=round(elapsed, 1),
            )


class ImageCache:
    """Content-addressed image files: ``root/<aa>/<sha256><ext>``, plus a URL → digest index."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _url_entry(self, url: str) -> Path:
        return self.root / "urls" / hashlib.sha256(url.encode()).hexdigest()

    def lookup(self, url: str) -> Path | None:
        entry = self._url_entry(url)
        if entry.exists():
            path = self.root / entry.read_text().strip()
            if path.exists():
                return path
        return None

    def put(self, data: bytes, url: str = "") -> Path:
        digest = hashlib.sha256(data).hexdigest()
        suffix = Path(url.split("?d=")[-1].split("?")[0]).suffix.lower() if url else ""
        relative = Path(digest[:2]) / f"{digest}{suffix if len(suffix) <= 5 else ''}"
        path = self.root / relative
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.{os.getpid()}")
            temporary.write_bytes(data)
            os.replace(temporary, path)
        if url:
            entry = self._url_entry(url)
            entry.parent.mkdir(parents=True, exist_ok=True)
            temporary = entry.with_name(f".{entry.name}.{os.getpid()}")
            temporary.write_text(str(relative))
            os.replace(temporary, entry)
        return path

    def fetch(self, url: str, client: LabelStudioExport) -> tuple[Path, bool]:
        """``(path, downloaded)``: the cached file for ``url``, downloading it only the first time."""
        cached = self.lookup(url)
        if cached is not None:
            return cached, False
        if url.startswith("/") and not url.startswith("/data/") and Path(url).exists():
            return self.put(Path(url).read_bytes(), url), True
        return self.put(client.image_bytes(url), url), True


def digest_of(path: Path) -> str:
    """sha256 of a cached image (its file name) or of any file's bytes."""
    stem = path.stem
    if len(stem) == 64 and all(c in "0123456789abcdef" for c in stem):
        return stem
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class TrainingSet:
    normals: list[Path] = field(default_factory=list)
    anomalies: list[tuple[Path, np.ndarray | None]] = field(default_factory=list)
    source: str = "label-studio"
    n_tasks: int = 0
    downloaded: int = 0


def collect_label_studio(project: str, settings: Any, progress: JobProgress) -> TrainingSet:
    """Export the project's annotations and cache their images."""
    client = LabelStudioExport(settings.label_studio_url, settings.label_studio_api_key, settings=settings)
    progress("fetch", 0, 1)
    tasks = client.export(project)
    labeled = labeled_images(tasks)
    progress("fetch", 1, 1)
    cache = ImageCache(Path(settings.cache_dir) / "images")
    found = TrainingSet(n_tasks=len(tasks))
    seen: set[str] = set()
    for i, item in enumerate(labeled):
        path, downloaded = cache.fetch(item.url, client)
        found.downloaded += downloaded
        if path.name in seen:  # the same image in two tasks: keep it once
            continue
        seen.add(path.name)
        if item.verdict == "normal":
            found.normals.append(path)
        else:
            found.anomalies.append((path, item.mask))
        progress("download", i + 1, len(labeled))
    return found


def choose_mode(
    requested: str, current: Any, kind: str, normals: list[Path], max_fraction: float
) -> tuple[str, list[Path], str]:
    """``(mode, images_to_train_on, why)``: incremental only when it is equivalent to adding images."""
    if requested == "full" or current is None:
        return "full", normals, "requested" if requested == "full" else "no current version"
    from defect_assist.models import model_class

    if current.kind != kind or not model_class(kind).supports_incremental:
        return "full", normals, f"{current.kind} → {kind} or no incremental support"
    trained = set(current.metadata.get("extra", {}).get("training_images", []))
    digests = {digest_of(p): p for p in normals}
    if not trained or not trained <= set(digests):
        return "full", normals, "earlier training images changed or were relabeled"
    new = [p for d, p in digests.items() if d not in trained]
    if not new:
        return "full", normals, "no new normals"
    if requested == "auto" and len(new) > max_fraction * len(trained):
        return "full", normals, f"{len(new)} new vs {len(trained)} trained exceeds the incremental share"
    return "incremental", new, f"{len(new)} new normals"


def _best_f1_threshold(negatives: np.ndarray, positives: np.ndarray) -> tuple[float, float]:
    """Threshold maximising F1 (positives = anomalous) and that F1."""
    values = np.concatenate([negatives, positives])
    labels = np.concatenate([np.zeros(len(negatives)), np.ones(len(positives))])
    order = np.argsort(-values)
    values, labels = values[order], labels[order]
    true_pos = np.cumsum(labels)
    predicted = np.arange(1, len(values) + 1)
    f1 = 2 * true_pos / (predicted + len(positives))
    best = int(np.argmax(f1))
    below = values[best + 1] if best + 1 < len(values) else values[best] - 1e-6
    return float((values[best] + below) / 2), float(f1[best])


def evaluate_and_calibrate(
    model: Any, held_out: list[Path], anomalies: list[tuple[Path, np.ndarray | None]]
) -> dict[str, Any]:
    """Image/pixel AUROC on labeled anomalies vs held-out normals; F1-optimal thresholds from them."""
    from sklearn.metrics import roc_auc_score

    calibration = model.calibration
    normal_predictions = model.predict(held_out) if held_out else []
    anomaly_predictions = model.predict([path for path, _ in anomalies])
    normal_scores = np.array([p.raw_score for p in normal_predictions if p.ok])
    anomaly_scores = np.array([p.raw_score for p in anomaly_predictions if p.ok])
    threshold_normalised = calibration.normalise_score(anomaly_scores) if len(anomaly_scores) else np.zeros(0)
    metrics: dict[str, Any] = {
        "n_anomalies": len(anomaly_scores),
        "n_heldout_normals": len(normal_scores),
        "anomaly_recall_normal_only_threshold": round(float(np.mean(threshold_normalised >= 0.5)), 4)
        if len(anomaly_scores)
        else None,
    }
    if len(normal_scores) and len(anomaly_scores):
        labels = np.r_[np.zeros(len(normal_scores)), np.ones(len(anomaly_scores))]
        metrics["image_auroc"] = round(float(roc_auc_score(labels, np.r_[normal_scores, anomaly_scores])), 4)
        threshold, f1 = _best_f1_threshold(normal_scores, anomaly_scores)
        metrics |= {"image_f1": round(f1, 4), "image_threshold_normal_only": calibration.image_threshold}
        calibration.image_threshold = threshold
        calibration.source = "held-out normals + labeled anomalies (F1-optimal)"
    pixels, pixel_labels = [], []
    for (_, mask), prediction in zip(anomalies, anomaly_predictions, strict=True):
        if (
            mask is None
            or not prediction.ok
            or prediction.anomaly_map is None
            or prediction.anomaly_map.shape != mask.shape
        ):
            continue
        pixels.append(prediction.anomaly_map[::2, ::2].reshape(-1))
        pixel_labels.append(mask[::2, ::2].reshape(-1))
    for prediction in normal_predictions[:10]:
        if prediction.ok and prediction.anomaly_map is not None:
            pixels.append(prediction.anomaly_map[::4, ::4].reshape(-1))
            pixel_labels.append(np.zeros(pixels[-1].shape, bool))
    if pixels and any(label.any() for label in pixel_labels):
        values, labels = np.concatenate(pixels), np.concatenate(pixel_labels)
        if labels.any() and not labels.all():
            metrics["pixel_auroc"] = round(float(roc_auc_score(labels, values)), 4)
            sample = np.random.default_rng(0).choice(len(values), min(len(values), 200_000), replace=False)
            normalised, f1 = _best_f1_threshold(
                values[sample][~labels[sample]], values[sample][labels[sample]]
            )
            normalised = min(max(normalised, 1e-4), 1 - 1e-4)
            metrics |= {"pixel_f1": round(f1, 4), "pixel_threshold_normal_only": calibration.pixel_threshold}
            calibration.pixel_threshold += calibration.pixel_scale * math.log(normalised / (1 - normalised))
    return metrics


def train_and_publish(
    project: str,
    normals: list[Path],
    anomalies: list[tuple[Path, np.ndarray | None]],
    *,
    settings: Any,
    mode: str = "auto",
    options: dict[str, Any] | None = None,
    progress: JobProgress | None = None,
    max_incremental_fraction: float = 0.5,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (full or incremental), evaluate, calibrate and publish one new version of ``project``."""
    from defect_assist.models import create_model
    from defect_assist.settings import resolve_device
    from defect_assist.store import ModelStore

    progress = progress or JobProgress()
    if not normals:
        raise ValueError(f"project {project}: no normal images annotated yet")
    store = ModelStore(settings.model_dir)
    current = store.current(project)
    kind = current.kind if current and mode != "full" else settings.model_kind
    device = resolve_device(settings.device)
    chosen, to_train, why = choose_mode(mode, current, kind, normals, max_incremental_fraction)
    progress.set(
        mode=chosen, mode_reason=why, n_normals=len(normals), n_anomalies=len(anomalies), device=device
    )
    started = time.perf_counter()
    held_out: list[Path] = []
    if chosen == "incremental":
        assert current is not None
        model = store.load(project, current.version, device=device)
        model.update(to_train, progress=progress)
        details: dict[str, Any] = {"added_images": len(to_train), "base_version": current.version}
    else:
        config = dict(current.metadata.get("config", {})) if current and current.kind == kind else {}
        config |= options or {}
        model = create_model(kind, device=device, **config)
        train = list(to_train)
        if anomalies and len(train) >= 6:  # hold normals out to measure against the labeled anomalies
            random.Random(0).shuffle(train)
            n_held = min(50, max(2, len(train) // 5))
            held_out, train = train[:n_held], train[n_held:]
        model.fit(train, progress=progress)
        details = {}
    train_seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {}
    if anomalies:
        progress("evaluate", 0, 1)
        metrics = evaluate_and_calibrate(model, held_out, anomalies)
        if held_out and model.supports_incremental:  # the held-out normals still count as training data
            model.update(held_out)
            model.metadata.update = "full"
        progress("evaluate", 1, 1)
    assert model.metadata is not None
    model.metadata.update = chosen
    model.metadata.metrics |= metrics
    model.metadata.extra |= {
        "training_images": sorted(digest_of(p) for p in normals),
        "mode_reason": why,
        "train_seconds": round(train_seconds, 2),
        **details,
        **(extra or {}),
    }
    progress("publish", 0, 1)
    info = store.publish(project, model)
    progress("publish", 1, 1)
    stale_points = mark_similarity_index_stale(project, info.version, settings)
    return {
        "project": project,
        "version": info.version,
        "mode": chosen,
        "mode_reason": why,
        "device": device,
        "n_normals": len(normals),
        "n_anomalies": len(anomalies),
        "trained_on": len(to_train),
        "train_seconds": round(train_seconds, 2),
        "metrics": metrics,
        "similarity_stale_points": stale_points,
    }


def mark_similarity_index_stale(project: str, version: str, settings: Any) -> int | None:
    """Flag the project's similarity points embedded by older versions (no re-embedding: a retrain stays
    fast; ``defect-assist index`` re-embeds them). Best effort: ``None`` when the index is unavailable."""
    try:
        from defect_assist.similarity.index import SimilarityIndex
    except ImportError:  # the explore extra is not installed
        return None
    if not settings.qdrant_url and not Path(settings.qdrant_path).exists():
        return None  # no embedded index was ever built
    try:
        index = SimilarityIndex.from_settings(project, settings)
    except Exception as error:  # embedded storage held by another process, server down …
        logger.warning("similarity index of project %s not marked stale: %s", project, error)
        return None
    try:
        return index.mark_stale(version)
    except Exception as error:
        logger.warning("similarity index of project %s not marked stale: %s", project, error)
        return None
    finally:
        index.close()


def retrain(
    project: str | int,
    reason: str = "manual",
    mode: str | None = None,
    images: list[str] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The rq job body. ``images`` (local normal images) bypasses Label Studio (FiftyOne, tests)."""
    from rq import get_current_job

    from defect_assist.settings import get_settings

    project = str(project)
    job = get_current_job()
    if job is not None:
        die_with_parent()
    settings = worker_settings = get_settings()
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
            from defect_assist_worker.triggers import job_started

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
            mode=mode or worker_settings.retrain_mode,
            options={**worker_settings.model_options, **(options or {})},
            progress=progress,
            max_incremental_fraction=worker_settings.incremental_max_fraction,
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
            finished_at=result["finished_at"],
        )
        return result
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
            from defect_assist_worker.triggers import job_finished

            job_finished(project, job.id, job.connection)


def summarize(result: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in result.items() if k not in {"metrics"})


__all__ = ["ImageCache", "JobProgress", "TrainingSet", "retrain", "train_and_publish"]

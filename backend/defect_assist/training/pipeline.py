"""The one train-and-publish path: train (full or incremental), check on labels, calibrate, publish.

The CLI's ``train``, the retrain worker's job and the FiftyOne plugin all call
:func:`train_and_publish`; every version it publishes records the digests of its training images,
so the next retrain can tell whether adding images (incremental) is equivalent to a full fit.
"""

from __future__ import annotations

import importlib.util
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from defect_assist.core.models.registry import create_model
from defect_assist.core.settings import Settings, resolve_device
from defect_assist.core.store import ModelStore
from defect_assist.training.image_cache import digest_of
from defect_assist.training.labeled_calibration import evaluate_and_calibrate
from defect_assist.training.mode import choose_mode
from defect_assist.training.progress import TrainingProgress

logger = logging.getLogger(__name__)

LabeledAnomaly = tuple[Path, np.ndarray | None]  # image, defect mask when one was drawn


def train_and_publish(
    project: str,
    normals: Sequence[Path],
    anomalies: Sequence[LabeledAnomaly] = (),
    *,
    settings: Settings,
    kind: str | None = None,
    mode: str = "auto",
    options: dict[str, Any] | None = None,
    device: str | None = None,
    progress: TrainingProgress | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (full or incremental), evaluate, calibrate and publish one new version of ``project``.

    ``kind`` defaults to the current version's kind (``MODEL_KIND`` for a first model or a full
    retrain); a full fit keeps the current version's options when the kind is the same, with
    ``options`` on top.
    """
    progress = progress or TrainingProgress()
    normals = [Path(p) for p in normals]
    anomalies = list(anomalies)
    if not normals:
        raise ValueError(f"project {project}: no normal images annotated yet")
    store = ModelStore(settings.model_dir)
    current = store.current(project)
    kind = kind or (current.kind if current and mode != "full" else settings.model_kind)
    device = resolve_device(device or settings.device)
    chosen, to_train, why = choose_mode(mode, current, kind, normals, settings.incremental_max_fraction)
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
        model = create_model(kind, device=device, **(config | (options or {})))
        train = list(to_train)
        if anomalies and len(train) >= 6:  # hold normals out to measure against the labeled anomalies
            random.Random(0).shuffle(train)
            n_held = min(50, max(2, len(train) // 5))
            held_out, train = train[:n_held], train[n_held:]
        model.fit(train, progress=progress)
        details = {}
    train_seconds = time.perf_counter() - started
    metrics = _check_on_labels(model, held_out, anomalies, progress)
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
    return {
        "project": project,
        "version": info.version,
        "kind": kind,
        "mode": chosen,
        "mode_reason": why,
        "device": device,
        "n_normals": len(normals),
        "n_anomalies": len(anomalies),
        "trained_on": len(to_train),
        "train_seconds": round(train_seconds, 2),
        "metrics": metrics,
        "similarity_stale_points": mark_similarity_index_stale(project, info.version, settings),
    }


def _check_on_labels(
    model: Any, held_out: list[Path], anomalies: list[LabeledAnomaly], progress: TrainingProgress
) -> dict[str, Any]:
    """With labeled anomalies: measure, re-calibrate on them, then absorb the held-out normals."""
    if not anomalies:
        return {}
    progress("evaluate", 0, 1)
    metrics = evaluate_and_calibrate(model, held_out, anomalies)
    if held_out and model.supports_incremental:  # the held-out normals still count as training data
        model.update(held_out)
    progress("evaluate", 1, 1)
    return metrics


def mark_similarity_index_stale(project: str, version: str, settings: Settings) -> int | None:
    """Flag the project's similarity points embedded by older versions (no re-embedding: a retrain stays
    fast; ``defect-assist index`` re-embeds them). ``None`` when there is no index to mark."""
    if importlib.util.find_spec("qdrant_client") is None:  # the explore extra is not installed
        return None
    if not settings.qdrant_url and not Path(settings.qdrant_path).exists():
        return None  # no embedded index was ever built
    from defect_assist.similarity.index import SimilarityIndex

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

"""The one train-and-publish path: train (full or incremental), check on labels, calibrate, compare, publish.

The CLI's ``train``, the retrain worker's job and the FiftyOne plugin all call
:func:`train_and_publish`. A retrain never forgets: it trains on the current version's normals plus
the new ones, minus the images marked defective (:mod:`defect_assist.training.training_set`), read
back from the images every version keeps (:mod:`defect_assist.training.image_archive`); the new
version becomes current only when it is not worse than the current one on the check set
(:mod:`defect_assist.training.version_check`), else it is published as a candidate.
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

from defect_assist.core.labeled_calibration import evaluate_and_calibrate
from defect_assist.core.models.registry import create_model
from defect_assist.core.refinement import MIN_CORRECTED
from defect_assist.core.settings import Settings, resolve_device
from defect_assist.core.store import ModelStore, PublishError
from defect_assist.training.image_archive import ImageArchive
from defect_assist.training.image_cache import digest_of
from defect_assist.training.mode import choose_mode
from defect_assist.training.progress import TrainingProgress
from defect_assist.training.training_set import Previous, plan_training_set, require_minimum
from defect_assist.training.version_check import CHECK_LIMIT, CheckResult, VersionScores, decide, image_scores

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
    keep_previous: bool = True,
) -> dict[str, Any]:
    """Train (full or incremental), evaluate, calibrate, compare and publish one new version of ``project``.

    ``normals`` are the new normal images: the current version's are added to them (unless
    ``keep_previous`` is false), ``anomalies`` are never trained on. ``kind`` defaults to the current
    version's kind (``MODEL_KIND`` for a first model or a full retrain); a full fit keeps the current
    version's options when the kind is the same, with ``options`` on top. Raises
    :class:`~defect_assist.training.training_set.TrainingRefused` below the minimum of normals.
    """
    progress = progress or TrainingProgress()
    anomalies = list(anomalies)
    store = ModelStore(settings.model_dir)
    current = store.current(project)
    given = {digest_of(Path(p)): Path(p) for p in normals}
    marked = {digest_of(Path(p)): Path(p) for p, _ in anomalies}
    previous = Previous.of(current.version, current.metadata) if current else Previous()
    plan = plan_training_set(previous, given, marked, keep_previous)
    require_minimum(project, plan, len(plan.training))  # before anything slow; again once images are found
    kind = kind or (current.kind if current and mode != "full" else settings.model_kind)
    device = resolve_device(device or settings.device)
    chosen, why = choose_mode(mode, current, kind, plan, settings.incremental_max_fraction)
    archive = ImageArchive(store.images_dir(project), [Path(settings.cache_dir) / "images"])
    known = given | marked
    if chosen == "incremental":  # the earlier images are in the model already (kept here if found)
        paths = archive.resolve([d for d in plan.training if d not in previous.trained], known)
        paths |= archive.resolve(archive.not_kept(previous.trained), known)
        trained = list(plan.training)
    else:
        paths = archive.resolve(plan.training, known)
        trained = [d for d in plan.training if d in paths]
    missing = len(plan.training) - len(trained)
    if missing:
        why += f"; {missing} earlier training images no longer found"
    require_minimum(project, plan, len(trained))
    n_previous = len(previous.trained.intersection(trained))
    progress.set(
        mode=chosen,
        mode_reason=why,
        n_normals=len(given),
        n_previous=n_previous,
        n_anomalies=len(anomalies),
        n_check_normals=len(plan.check),
        device=device,
    )
    compare = _sample(archive.resolve(plan.compare[:CHECK_LIMIT], known))
    defects = _sample(archive.resolve(plan.defects[:CHECK_LIMIT], known))
    new = [given[d] for d in plan.new[:CHECK_LIMIT]]
    current_model, reference, new_by_current = None, None, None
    if current is not None:
        current_model, reference, new_by_current = _reference(
            store, current, device, chosen, compare, defects, new, progress
        )
    started = time.perf_counter()
    held_out: list[Path] = []
    if chosen == "incremental":
        assert current is not None and current_model is not None
        model = current_model
        to_train = [paths[d] for d in plan.training if d not in previous.trained]
        update = model.update(to_train, progress=progress)
        details: dict[str, Any] = {"added_images": len(to_train), **update}
    else:
        current_model = None  # free it before the fit
        to_train = [paths[d] for d in trained]
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
    check = _compare(model, current, reference, new_by_current, compare, defects, progress)
    referenced = {*trained, *plan.check, *plan.defects}  # what a later retrain may need back
    try:
        kept = archive.keep({d: p for d, p in (paths | known).items() if d in referenced})
    except OSError as error:  # disk full before the publish: the current version keeps serving
        raise PublishError(project, "keeping the training images", error) from error
    assert model.metadata is not None
    model.metadata.update = chosen
    model.metadata.metrics |= metrics
    model.metadata.extra |= {
        "training_images": trained,
        "check_images": list(plan.check),
        "defect_images": list(plan.defects),
        "base_version": current.version if current else None,
        "mode_reason": why,
        "train_seconds": round(train_seconds, 2),
        "check": {"current": check.make_current, "reason": check.reason, **check.metrics},
        **details,
        **(extra or {}),
    }
    progress("publish", 0, 1)
    info = store.publish(project, model, make_current=check.make_current, candidate_reason=check.reason)
    progress("publish", 1, 1)
    return {
        "project": project,
        "version": info.version,
        "current": info.is_current,
        "status": info.status,
        "check_reason": check.reason,
        "check": check.metrics,
        "kind": kind,
        "mode": chosen,
        "mode_reason": why,
        "device": device,
        "n_normals": len(given),
        "n_previous": n_previous,
        "n_new": len(plan.new),
        "n_anomalies": len(anomalies),
        "n_check_normals": len(plan.check),
        "n_defects_excluded": len(plan.defects),
        "relabeled_defective": len(plan.removed),
        "missing_previous": missing,
        "kept_images": kept,
        "trained_on": len(to_train),
        "n_train_images": model.metadata.n_train_images,
        "train_seconds": round(train_seconds, 2),
        "metrics": metrics,
        "similarity_stale_points": mark_similarity_index_stale(project, info.version, settings)
        if info.is_current
        else None,
    }


def _sample(found: dict[str, Path]) -> list[Path]:
    return [found[d] for d in sorted(found)]


def _reference(
    store: ModelStore,
    current: Any,
    device: str,
    chosen: str,
    compare: list[Path],
    defects: list[Path],
    new: list[Path],
    progress: TrainingProgress,
) -> tuple[Any, VersionScores | None, np.ndarray | None]:
    """The current model and its scores on the check set and on the new normals, before any training."""
    try:
        model = store.load(current.project, current.version, device=device)
    except Exception as error:
        if chosen == "incremental":
            raise
        logger.warning("current version %s not loadable, not compared: %s", current.version, error)
        return None, None, None
    progress("reference", 0, 1)
    scores = VersionScores(image_scores(model, compare), image_scores(model, defects))
    new_by_current = image_scores(model, new)
    progress("reference", 1, 1)
    return model, scores, new_by_current


def _compare(
    model: Any,
    current: Any,
    reference: VersionScores | None,
    new_by_current: np.ndarray | None,
    compare: list[Path],
    defects: list[Path],
    progress: TrainingProgress,
) -> CheckResult:
    """Score the new model on the same check set and decide whether it becomes current."""
    if current is None:
        return decide(VersionScores(), None)
    if reference is None:
        return CheckResult(True, f"{current.version} could not be loaded: made current without a comparison")
    progress("check", 0, 1)
    scores = VersionScores(image_scores(model, compare), image_scores(model, defects))
    progress("check", 1, 1)
    return decide(scores, reference, new_by_current, current.version)


def _check_on_labels(
    model: Any, held_out: list[Path], anomalies: list[LabeledAnomaly], progress: TrainingProgress
) -> dict[str, Any]:
    """With labeled anomalies: learn the defect head from their masks, measure, re-calibrate on them,
    then absorb the held-out normals."""
    if not anomalies:
        return {}
    progress("evaluate", 0, 1)
    corrected = [(path, mask) for path, mask in anomalies if mask is not None and mask.any()]
    head: dict[str, Any] = {}
    if model.supports_corrections and len(corrected) >= MIN_CORRECTED:
        head = model.learn_from_corrections(corrected, held_out)  # masks drawn from the corrections
    metrics = evaluate_and_calibrate(model, held_out, anomalies) | ({"defect_head": head} if head else {})
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

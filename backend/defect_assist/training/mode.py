"""Full or incremental: an incremental update only when it equals adding images to the last training set."""

from __future__ import annotations

from typing import Any

from defect_assist.core.models.registry import model_class
from defect_assist.training.training_set import TrainingPlan


def choose_mode(
    requested: str, current: Any, kind: str, plan: TrainingPlan, max_fraction: float
) -> tuple[str, str]:
    """``(mode, why)``: incremental only when it is equivalent to adding images to the current version's
    training set (nothing it trained on is left out: a normal relabelled defective forces a full fit)."""
    if current is None:
        return "full", "no current version"
    if requested == "full":
        return "full", "requested"
    if current.kind != kind or not model_class(kind).supports_incremental:
        return "full", f"{current.kind} → {kind} or no incremental support"
    trained = plan.previous.trained
    if not trained:
        return "full", f"{current.version} records no training images"
    dropped = trained - set(plan.training)
    if dropped and dropped <= set(plan.defects):
        return "full", f"{len(dropped)} earlier training normals were marked defective: a fit without them"
    if dropped:
        return "full", f"{len(dropped)} earlier training images left out"
    new = set(plan.training) - trained
    if not new:
        return "full", "no new normals"
    if requested == "auto" and len(new) > max_fraction * len(trained):
        return "full", f"{len(new)} new vs {len(trained)} trained exceeds the incremental share"
    return "incremental", f"{len(new)} new normals"

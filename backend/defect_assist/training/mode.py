"""Full or incremental: an incremental update only when it equals adding images to the last training set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from defect_assist.core.models.registry import model_class
from defect_assist.training.image_cache import digest_of


def choose_mode(
    requested: str, current: Any, kind: str, normals: list[Path], max_fraction: float
) -> tuple[str, list[Path], str]:
    """``(mode, images_to_train_on, why)``: incremental only when it is equivalent to adding images."""
    if requested == "full" or current is None:
        return "full", normals, "requested" if requested == "full" else "no current version"
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

"""What a retrain trains on: the previous training normals plus the new ones, minus those marked defective.

Images are identified by the sha256 of their bytes (their digest), whatever they came from (a
folder, FiftyOne, Label Studio). The rule (docs/retraining.md, "Retrains never forget"):

- **pool** = the current version's normals (trained on or held out) ∪ the new normals − the images
  marked defective. Defective = this retrain's annotated defects ∪ the current version's recorded
  defects, except those this retrain now gives as normal (the newest label wins).
- **check normals**: an image that enters the pool while it holds at least :data:`CHECK_MIN_POOL`
  normals is held out for good when its digest hash falls in the :data:`CHECK_PERCENT` % share;
  once held out it stays held out, once trained on it stays trained on, so no version of the
  project trains on a check normal and every version can be compared on them.
- **training** = pool − check normals; a retrain refuses (:class:`TrainingRefused`) below
  :data:`MIN_TRAINING_NORMALS`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

MIN_TRAINING_NORMALS = 10  # below it the model calibrates on its own training images (fit holds none out)
CHECK_MIN_POOL = 50  # normals in the pool before new images start being held out to check versions
CHECK_PERCENT = 10  # share of images (by digest hash) held out as check normals


class TrainingRefused(ValueError):
    """A retrain that cannot make a usable model; the job fails with this reason (no retry)."""


def is_check_digest(digest: str) -> bool:
    """Whether an image's digest puts it in the held-out share (stable: the same image, the same answer)."""
    return int(digest[-8:], 16) % 100 < CHECK_PERCENT


@dataclass(frozen=True)
class Previous:
    """What the current version was made from (digests from its metadata)."""

    version: str | None = None
    trained: frozenset[str] = frozenset()
    check: frozenset[str] = frozenset()
    defects: frozenset[str] = frozenset()

    @classmethod
    def of(cls, version: str | None, metadata: dict[str, Any] | None) -> Previous:
        extra = (metadata or {}).get("extra", {})
        return cls(
            version,
            frozenset(extra.get("training_images", [])),
            frozenset(extra.get("check_images", [])),
            frozenset(extra.get("defect_images", [])),
        )


@dataclass(frozen=True)
class TrainingPlan:
    """Digests (sorted) of what a retrain trains on, holds out and checks against."""

    training: tuple[str, ...]
    check: tuple[str, ...]  # held out: this version never trains on them
    compare: tuple[str, ...]  # check normals the current version did not train on either
    new: tuple[str, ...]  # normals the current version did not know
    defects: tuple[str, ...]  # marked defective: never trained on, checked against
    removed: tuple[str, ...]  # the current version's normals now marked defective
    previous: Previous = field(default_factory=Previous)

    @property
    def pool(self) -> int:
        return len(self.training) + len(self.check)


def plan_training_set(
    previous: Previous, normals: Iterable[str], defects: Iterable[str], keep_previous: bool = True
) -> TrainingPlan:
    """The training set rule (module docstring); ``keep_previous=False`` starts from ``normals`` only."""
    given, marked = set(normals), set(defects)
    defective = marked | (previous.defects - (given - marked))
    known = (previous.trained | previous.check) if keep_previous else frozenset()
    pool = (known | given) - defective
    new = pool - previous.trained - previous.check
    held = {d for d in new if is_check_digest(d)} if len(pool) >= CHECK_MIN_POOL else set()
    check = (pool & previous.check) | held
    return TrainingPlan(
        training=tuple(sorted(pool - check)),
        check=tuple(sorted(check)),
        compare=tuple(sorted(check - previous.trained)),
        new=tuple(sorted(new)),
        defects=tuple(sorted(defective)),
        removed=tuple(sorted((previous.trained | previous.check) & defective)),
        previous=previous,
    )


def require_minimum(project: str, plan: TrainingPlan, available: int) -> None:
    """Refuse a retrain with fewer than :data:`MIN_TRAINING_NORMALS` normals to train on."""
    if not plan.pool:
        raise TrainingRefused(f"project {project}: no normal images annotated yet")
    if available >= MIN_TRAINING_NORMALS:
        return
    parts = [f"{len(plan.previous.trained)} from {plan.previous.version}"] if plan.previous.version else []
    parts.append(f"{len(plan.new)} new")
    if plan.check:
        parts.append(f"{len(plan.check)} held out to check versions")
    if plan.defects:
        parts.append(f"{len(plan.defects)} marked defective")
    missing = len(plan.training) - available
    if missing > 0:
        parts.append(f"{missing} earlier images no longer found")
    raise TrainingRefused(
        f"project {project}: only {available} normal images to train on ({', '.join(parts)}); "
        f"a retrain needs at least {MIN_TRAINING_NORMALS}: mark more images normal"
    )

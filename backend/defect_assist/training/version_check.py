"""Before a new version becomes current: compare it with the current one on the same check set.

The check set is the project's held-out check normals that neither version trained on
(:mod:`defect_assist.training.training_set`) and the images annotated defective. Scores are the
calibrated image scores, 0.5 being each version's own decision threshold. The new version becomes
current unless one of these holds (docs/retraining.md, "Retrains never forget"):

- it calls more check normals anomalous than the current one, by more than
  ``max(1, ceil(FPR_SLACK · n))`` images (5 percentage points, at least one image);
- it finds fewer annotated defects, by more than ``max(1, ceil(RECALL_SLACK · k))`` (10 points);
- with at least :data:`AUROC_MIN_EACH` check normals and defects: its image AUROC is lower by
  more than :data:`AUROC_SLACK`;
- the new normals look anomalous to the current version far more often than its check normals do:
  more than ``p·m + 2·sqrt(m·p·(1−p)) + max(1, 0.1·m)`` of the ``m`` new normals score ≥ 0.5, with
  ``p = max((fp + 1) / (n + 2), 0.05)`` its false-positive rate on the ``n`` check normals (a few
  images never claim a rate of 0). Defects presented as normals are caught here even when no defect
  was annotated.

Otherwise it is published as a candidate with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

FPR_SLACK = 0.05
RECALL_SLACK = 0.10
AUROC_SLACK = 0.05
AUROC_MIN_EACH = 5
SUSPECT_MARGIN = 0.10
SUSPECT_SIGMAS = 2.0
MIN_REFERENCE_FPR = 0.05
CHECK_LIMIT = 200  # images of each kind scored per version (the first by digest: a stable sample)


@dataclass
class VersionScores:
    """One version's image scores on the check normals and on the annotated defects (NaN: unreadable)."""

    normals: np.ndarray = field(default_factory=lambda: np.zeros(0))
    defects: np.ndarray = field(default_factory=lambda: np.zeros(0))


@dataclass
class CheckResult:
    """Whether the new version becomes current, why, and the figures it was decided on."""

    make_current: bool
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)


def image_scores(model: Any, images: Sequence[Path]) -> np.ndarray:
    """Calibrated image scores of ``images`` (NaN where an image could not be read)."""
    if not images:
        return np.zeros(0)
    return np.array([p.score if p.ok else np.nan for p in model.predict(list(images))], dtype=float)


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep], b[keep]


def _auroc(normals: np.ndarray, defects: np.ndarray) -> float:
    labels = np.r_[np.zeros(len(normals)), np.ones(len(defects))]
    return float(roc_auc_score(labels, np.r_[normals, defects]))


def suspect_limit(new: int, false_positives: int, n_check: int) -> float:
    """How many of ``new`` normals the current version may call anomalous before they are suspect."""
    rate = max((false_positives + 1) / (n_check + 2), MIN_REFERENCE_FPR)
    spread = SUSPECT_SIGMAS * math.sqrt(new * rate * (1 - rate))
    return rate * new + spread + max(1.0, SUSPECT_MARGIN * new)


def decide(
    candidate: VersionScores,
    current: VersionScores | None,
    new_by_current: np.ndarray | None = None,
    current_name: str = "the current version",
) -> CheckResult:
    """The rule of the module docstring."""
    if current is None:
        return CheckResult(True, "first version of the project")
    failures: list[str] = []
    normals, normals_now = _paired(candidate.normals, current.normals)
    defects, defects_now = _paired(candidate.defects, current.defects)
    n, k = len(normals), len(defects)
    fp, fp_now = int(np.sum(normals >= 0.5)), int(np.sum(normals_now >= 0.5))
    metrics: dict[str, Any] = {"n_check_normals": n, "n_check_defects": k}
    if n:
        allowed = fp_now + max(1, math.ceil(FPR_SLACK * n))
        metrics |= {"false_positives": fp, "false_positives_current": fp_now}
        if fp > allowed:
            failures.append(
                f"it calls {fp} of {n} check normals anomalous ({current_name}: {fp_now}, at most {allowed})"
            )
    if k:
        found, found_now = int(np.sum(defects >= 0.5)), int(np.sum(defects_now >= 0.5))
        needed = found_now - max(1, math.ceil(RECALL_SLACK * k))
        metrics |= {"defects_found": found, "defects_found_current": found_now}
        if found < needed:
            failures.append(
                f"it finds {found} of {k} annotated defects ({current_name}: {found_now}, at least {needed})"
            )
        if n >= AUROC_MIN_EACH and k >= AUROC_MIN_EACH:
            auroc, auroc_now = _auroc(normals, defects), _auroc(normals_now, defects_now)
            metrics |= {"image_auroc": round(auroc, 4), "image_auroc_current": round(auroc_now, 4)}
            if auroc < auroc_now - AUROC_SLACK:
                failures.append(
                    f"its image AUROC is {auroc:.3f} ({current_name}: {auroc_now:.3f}, "
                    f"at least {auroc_now - AUROC_SLACK:.3f})"
                )
    new = new_by_current[~np.isnan(new_by_current)] if new_by_current is not None else np.zeros(0)
    if len(new):
        flagged, limit = int(np.sum(new >= 0.5)), suspect_limit(len(new), fp_now, n)
        metrics |= {"new_normals_scored": len(new), "new_normals_anomalous_to_current": flagged}
        if flagged > limit:
            failures.append(
                f"{flagged} of {len(new)} new normals look anomalous to {current_name} "
                f"(at most {limit:.1f} expected): check their labels"
            )
    if failures:
        return CheckResult(False, "not made current: " + "; ".join(failures), metrics)
    if not (n or k):
        return CheckResult(True, "no check normals or annotated defects yet: made current unchecked", metrics)
    checked = f"{n} check normals" + (f" and {k} annotated defects" if k else "")
    return CheckResult(True, f"not worse than {current_name} on {checked}", metrics)

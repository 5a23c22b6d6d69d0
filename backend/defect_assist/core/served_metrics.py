"""What annotators are served, measured: the verdict and the mask at the served thresholds.

AUROC and AUPRO rank scores; an annotator sees a verdict and a mask. Per test image this module
takes the served verdict (``Prediction.is_anomalous``) and the served mask (``Prediction.mask``, the
anomaly map above the pixel threshold) and reports, overall and per defect type:

- image precision, recall and F1 of the verdict;
- Dice and IoU of the mask on every defect image with a ground-truth mask (an empty served mask
  scores 0), their means and the share of defect images with Dice >= 0.5;
- the share of normal images that get any mask pixel;
- verdict/mask disagreements: *anomalous* with an empty mask, *normal* with mask pixels.

Masks are compared at the evaluation size (``EVAL_SIZE``), nearest-neighbour resized, so every image
weighs the same, as the pixel metrics do.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

DICE_GOOD = 0.5


@dataclass(frozen=True)
class ServedImage:
    """One test image as served: truth (type, mask) next to the served verdict and mask."""

    defect_type: str  # "good" for normals
    verdict: bool  # served: anomalous
    mask: np.ndarray  # served mask, bool, evaluation size
    truth: np.ndarray | None  # ground-truth mask, bool, evaluation size (None: defect without a mask)

    @property
    def is_anomalous(self) -> bool:
        return self.defect_type != "good"


def dice_iou(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks; both empty counts as a perfect match."""
    intersection = float(np.logical_and(predicted, truth).sum())
    total = float(predicted.sum() + truth.sum())
    union = total - intersection
    if total == 0:
        return 1.0, 1.0
    return 2.0 * intersection / total, intersection / union


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def _verdicts(images: list[ServedImage]) -> dict[str, float]:
    tp = sum(1 for i in images if i.is_anomalous and i.verdict)
    fp = sum(1 for i in images if not i.is_anomalous and i.verdict)
    fn = sum(1 for i in images if i.is_anomalous and not i.verdict)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = (
        _ratio(2 * precision * recall, precision + recall)
        if not (math.isnan(precision) or math.isnan(recall))
        else math.nan
    )
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def _masks(images: list[ServedImage]) -> dict[str, float]:
    pairs = [dice_iou(i.mask, i.truth) for i in images if i.is_anomalous and i.truth is not None]
    dice = [d for d, _ in pairs]
    return {
        "mean_dice": float(np.mean(dice)) if dice else math.nan,
        "mean_iou": float(np.mean([iou for _, iou in pairs])) if pairs else math.nan,
        "share_dice_ge_0_5": float(np.mean([d >= DICE_GOOD for d in dice])) if dice else math.nan,
        "n_masked_defects": len(dice),
    }


def served_metrics(images: list[ServedImage]) -> dict[str, Any]:
    """The served-quality report (JSON-friendly), overall and per defect type."""
    normals = [i for i in images if not i.is_anomalous]
    report: dict[str, Any] = {
        **_verdicts(images),
        **_masks(images),
        "normals_with_mask": _ratio(sum(1 for i in normals if i.mask.any()), len(normals)),
        "anomalous_without_mask": sum(1 for i in images if i.verdict and not i.mask.any()),
        "normal_with_mask": sum(1 for i in images if not i.verdict and i.mask.any()),
        "n_images": len(images),
    }
    by_type: dict[str, list[ServedImage]] = defaultdict(list)
    for image in images:
        if image.is_anomalous:
            by_type[image.defect_type].append(image)
    report["per_defect_type"] = {
        name: {
            "n": len(group),
            "recall": _ratio(sum(1 for i in group if i.verdict), len(group)),
            **{k: v for k, v in _masks(group).items() if k != "n_masked_defects"},
        }
        for name, group in sorted(by_type.items())
    }
    return report

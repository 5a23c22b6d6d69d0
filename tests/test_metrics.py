"""The evaluation metrics (anomalib/torchmetrics) agree with scikit-learn / a reference AUPRO."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score, roc_curve

from defect_assist.core.evaluation import f1_at, f1_max, image_auroc, pixel_aupro

pytestmark = pytest.mark.unit


@pytest.fixture
def scored_labels() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 400)
    scores = rng.normal(size=400) + 1.2 * labels + 25.0  # raw scores far outside [0, 1]
    return scores, labels


def test_auroc_matches_sklearn(scored_labels) -> None:
    scores, labels = scored_labels
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-5)


def test_auroc_of_perfect_and_inverted_scores() -> None:
    labels = np.array([0, 0, 1, 1])
    assert image_auroc(np.array([1.0, 2.0, 3.0, 4.0]), labels) == pytest.approx(1.0)
    assert image_auroc(np.array([4.0, 3.0, 2.0, 1.0]), labels) == pytest.approx(0.0)


def test_f1_at_threshold_matches_sklearn(scored_labels) -> None:
    scores, labels = scored_labels
    predicted = (scores > 25.6).astype(int)
    assert f1_at(predicted, labels) == pytest.approx(f1_score(labels, predicted), abs=1e-6)


def test_f1_max_matches_sklearn(scored_labels) -> None:
    scores, labels = scored_labels
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    assert f1_max(scores, labels) == pytest.approx(f1.max(), abs=1e-4)


def _reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Per-region overlap averaged over regions, vs. FPR on normal pixels, integrated to ``fpr_limit``."""
    thresholds = np.unique(np.quantile(maps, np.linspace(0, 1, 2001)))[::-1]
    regions = []
    for i in range(len(maps)):
        labelled, count = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, labelled == k) for k in range(1, count + 1)]
    negatives = ~masks
    fprs, pros = [0.0], [0.0]
    for threshold in thresholds:
        predicted = maps >= threshold
        fpr = (predicted & negatives).sum() / negatives.sum()
        pro = np.mean([predicted[i][region].mean() for i, region in regions])
        fprs.append(fpr)
        pros.append(pro)
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= fpr_limit
    fpr_cut, pro_cut = fprs[keep], pros[keep]
    # interpolate the PRO at exactly fpr_limit
    after = np.argmax(fprs > fpr_limit) if (fprs > fpr_limit).any() else None
    if after is not None:
        pro_at = np.interp(fpr_limit, [fprs[after - 1], fprs[after]], [pros[after - 1], pros[after]])
        fpr_cut, pro_cut = np.append(fpr_cut, fpr_limit), np.append(pro_cut, pro_at)
    return float(np.trapezoid(pro_cut, fpr_cut) / fpr_limit)


def test_aupro_matches_reference() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 48, 48), bool)
    masks[0, 5:15, 5:15] = True
    masks[1, 30:40, 10:20] = True
    masks[1, 2:6, 40:46] = True  # two regions in one image
    masks[3, 20:44, 20:30] = True
    maps = rng.random((6, 48, 48)) * 0.6 + ndimage.gaussian_filter(masks.astype(float), (0, 2, 2)) * 0.8
    ours = pixel_aupro(torch.from_numpy(maps).float(), torch.from_numpy(masks))
    assert ours == pytest.approx(_reference_aupro(maps, masks), abs=0.01)


def test_pixel_auroc_matches_sklearn_on_maps() -> None:
    rng = np.random.default_rng(1)
    masks = rng.random((4, 32, 32)) > 0.9
    maps = rng.random((4, 32, 32)) + masks * 0.5
    fpr, tpr, _ = roc_curve(masks.ravel(), maps.ravel())
    assert image_auroc(maps.ravel(), masks.ravel()) == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-5)


def test_served_metrics_on_hand_checked_masks() -> None:
    from defect_assist.core.served_metrics import ServedImage, dice_iou, served_metrics

    empty = np.zeros((4, 4), bool)
    truth = empty.copy()
    truth[0, :2] = True  # 2 defect pixels
    half = empty.copy()
    half[0, 1:3] = True  # 1 of them + 1 outside: Dice 2·1/(2+2) = 0.5, IoU 1/3
    assert dice_iou(half, truth) == pytest.approx((0.5, 1 / 3))
    assert dice_iou(empty, empty) == (1.0, 1.0)
    images = [
        ServedImage("crack", True, truth.copy(), truth),  # caught, exact mask
        ServedImage("crack", True, empty, truth),  # anomalous verdict without a mask: Dice 0
        ServedImage("fray", False, half, truth),  # missed verdict, but a mask (Dice 0.5)
        ServedImage("good", False, empty, None),
        ServedImage("good", True, half, None),  # false alarm with a mask
    ]
    report = served_metrics(images)
    assert (report["tp"], report["fp"], report["fn"]) == (2, 1, 1)
    assert report["precision"] == pytest.approx(2 / 3) and report["recall"] == pytest.approx(2 / 3)
    assert report["f1"] == pytest.approx(2 / 3)
    assert report["mean_dice"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert report["mean_iou"] == pytest.approx((1.0 + 0.0 + 1 / 3) / 3)
    assert report["share_dice_ge_0_5"] == pytest.approx(2 / 3)
    assert report["normals_with_mask"] == 0.5
    assert (report["anomalous_without_mask"], report["normal_with_mask"]) == (1, 1)
    assert report["per_defect_type"]["crack"]["recall"] == 1.0
    assert report["per_defect_type"]["fray"] == pytest.approx(
        {"n": 1, "recall": 0.0, "mean_dice": 0.5, "mean_iou": 1 / 3, "share_dice_ge_0_5": 1.0}
    )

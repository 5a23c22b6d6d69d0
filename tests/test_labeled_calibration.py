"""Thresholds from labels (``core.labeled_calibration``): labels may lower the served image threshold,
never raise it above the normal-only quantile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from defect_assist.core.calibration import Calibration
from defect_assist.core.labeled_calibration import evaluate_and_calibrate
from defect_assist.core.models.prediction import Prediction

pytestmark = pytest.mark.unit


class RawScores:
    """The part of a model ``evaluate_and_calibrate`` uses: a calibration and raw scores per path."""

    def __init__(self, scores: dict[Path, float], calibration: Calibration) -> None:
        self.scores, self.calibration = scores, calibration

    def predict(self, paths: list[Path]) -> list[Prediction]:
        return [Prediction(source=str(p), raw_score=self.scores[p]) for p in paths]


def _calibrated(normal_scores: list[float]) -> Calibration:
    return Calibration.from_normals(np.array(normal_scores), np.zeros(16), image_quantile=0.9)


def _case(normal_scores: list[float], anomaly_scores: list[float]) -> tuple[RawScores, list, list]:
    normals = [Path(f"n{i}.png") for i in range(len(normal_scores))]
    anomalies = [Path(f"a{i}.png") for i in range(len(anomaly_scores))]
    scores = dict(zip(normals + anomalies, normal_scores + anomaly_scores, strict=True))
    return RawScores(scores, _calibrated(normal_scores)), normals, [(a, None) for a in anomalies]


def test_labeled_defects_above_the_normal_threshold_leave_it_where_it_is() -> None:
    """Every labeled defect already scores above the normal-only threshold, a few normals score
    between: F1 on this sample would raise the threshold past those normals; served recall would drop."""
    normal_scores = [float(s) for s in range(20)] + [25.0, 26.0]
    model, normals, anomalies = _case(normal_scores, [24.0, 30.0, 31.0, 32.0])
    normal_only = model.calibration.image_threshold
    metrics = evaluate_and_calibrate(model, normals, anomalies)
    assert metrics["image_threshold_f1_optimal"] > normal_only  # what F1 alone would serve
    assert model.calibration.image_threshold == normal_only
    assert metrics["anomaly_recall_normal_only_threshold"] == 1.0


def test_labeled_defects_under_the_normal_threshold_lower_it() -> None:
    normal_scores = [float(s) for s in range(20)]
    model, normals, anomalies = _case(normal_scores, [14.5, 15.5, 16.5, 30.0])
    normal_only = model.calibration.image_threshold
    metrics = evaluate_and_calibrate(model, normals, anomalies)
    assert metrics["anomaly_recall_normal_only_threshold"] == 0.25
    assert 14.0 < model.calibration.image_threshold < 14.5 < normal_only
    assert (model.calibration.normalise_score(np.array([14.5, 30.0])) >= 0.5).all()
    assert "labeled anomalies" in model.calibration.source

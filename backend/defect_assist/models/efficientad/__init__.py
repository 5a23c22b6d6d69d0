"""EfficientAd trained offline: a distilled (or official) PDN teacher and anomalib 2.7's training logic."""

from defect_assist.models.efficientad.anomaly_model import SCHEDULES, EfficientAdAnomalyModel

__all__ = ["SCHEDULES", "EfficientAdAnomalyModel"]

"""EfficientAd trained offline: a distilled (or official) PDN teacher and anomalib 2.7's training logic.

Attributes are imported on first use, so ``defect_assist.models.efficientad.commands`` (the CLI) loads
without anomalib.
"""

from defect_assist.models import lazy_exports

__getattr__ = lazy_exports(
    __name__,
    {
        "SCHEDULES": "defect_assist.models.efficientad.anomaly_model",
        "EfficientAdAnomalyModel": "defect_assist.models.efficientad.anomaly_model",
    },
)

__all__ = ["SCHEDULES", "EfficientAdAnomalyModel"]

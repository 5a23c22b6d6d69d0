"""EfficientAd trained offline: a distilled (or official) PDN teacher and anomalib 2.7's training logic.

Attributes are imported on first use, so ``defect_assist.models.efficientad.commands`` (the CLI) loads
without anomalib.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SCHEDULES": "defect_assist.models.efficientad.anomaly_model",
    "EfficientAdAnomalyModel": "defect_assist.models.efficientad.anomaly_model",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SCHEDULES", "EfficientAdAnomalyModel"]

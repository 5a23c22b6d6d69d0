"""PatchCore: anomalib's model with an offline backbone, a coverage coreset and faiss search.

Attributes are imported on first use (anomalib takes seconds to import).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PatchcoreAnomalyModel": "defect_assist.models.patchcore.anomaly_model",
    "FastPatchcoreModel": "defect_assist.models.patchcore.torch_model",
    "coverage_select": "defect_assist.models.patchcore.torch_model",
    "estimate_radius": "defect_assist.models.patchcore.torch_model",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FastPatchcoreModel", "PatchcoreAnomalyModel", "coverage_select", "estimate_radius"]

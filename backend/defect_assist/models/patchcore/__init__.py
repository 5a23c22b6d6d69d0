"""PatchCore: anomalib's model with an offline backbone, a coverage coreset and faiss search.

Attributes are imported on first use (anomalib takes seconds to import).
"""

from defect_assist.models import lazy_exports

__getattr__ = lazy_exports(
    __name__,
    {
        "PatchcoreAnomalyModel": "defect_assist.models.patchcore.anomaly_model",
        "FastPatchcoreModel": "defect_assist.models.patchcore.torch_model",
        "coverage_select": "defect_assist.models.patchcore.torch_model",
        "estimate_radius": "defect_assist.models.patchcore.torch_model",
    },
)

__all__ = ["FastPatchcoreModel", "PatchcoreAnomalyModel", "coverage_select", "estimate_radius"]

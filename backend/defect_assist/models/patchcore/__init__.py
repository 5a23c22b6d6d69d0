"""PatchCore: anomalib's model with an offline backbone, a coverage coreset and faiss search."""

from defect_assist.models.patchcore.anomaly_model import PatchcoreAnomalyModel
from defect_assist.models.patchcore.torch_model import FastPatchcoreModel, coverage_select, estimate_radius

__all__ = ["FastPatchcoreModel", "PatchcoreAnomalyModel", "coverage_select", "estimate_radius"]

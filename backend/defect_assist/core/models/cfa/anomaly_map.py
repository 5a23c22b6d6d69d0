"""CFA's anomaly map: anomalib's scores, its Gaussian blur built once, valid-pixel smoothing.

Scores are anomalib's (:meth:`anomalib.models.image.cfa.anomaly_map.AnomalyMapGenerator.compute_score`:
square root of the distances to the memory bank, the K nearest, the nearest weighted by its softmin).
anomalib builds a ``GaussianBlur2d`` on every call; here the blur module is built once in
``__init__`` (same kernel, radius ``4σ``, reflect padding; σ may be fractional). Given the mask of
real image pixels (letterboxed inputs) the map is a normalised convolution over those pixels,
``blur(a · valid) / blur(valid)``, zero on the padding.
"""

from __future__ import annotations

import torch
from anomalib.models.components import GaussianBlur2d
from anomalib.models.image.cfa.anomaly_map import AnomalyMapGenerator as AnomalibCfaMap
from torch.nn import functional as F


class AnomalyMapGenerator(AnomalibCfaMap):
    """anomalib's CFA map generator with the blur built once and optional valid-pixel smoothing."""

    def __init__(self, num_nearest_neighbors: int, sigma: float = 4.0) -> None:
        super().__init__(num_nearest_neighbors=num_nearest_neighbors, sigma=sigma)  # type: ignore[arg-type]
        size = 2 * int(4.0 * sigma + 0.5) + 1
        self.blur = GaussianBlur2d(kernel_size=(size, size), sigma=(sigma, sigma), channels=1)
        kernel = self.blur._buffers.pop("kernel")  # derived from sigma: keep it out of state dicts
        self.blur.register_buffer("kernel", kernel, persistent=False)

    def compute_score(self, distance: torch.Tensor, scale: tuple[int, int]) -> torch.Tensor:
        """anomalib's score of squared distances clamped at 0 first: ``|f|² + |c|² − 2f·c`` can come out
        slightly negative in float32 for a feature at a centroid, and anomalib's square root is NaN there."""
        return super().compute_score(distance.clamp_min(0.0), scale)

    def compute_anomaly_map(
        self,
        score: torch.Tensor,
        image_size: tuple[int, int] | torch.Size | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Upsample (bilinear) and blur ``(B, 1, h, w)`` scores; ``valid`` (``B, H, W``): image pixels."""
        anomaly_map = score.mean(dim=1, keepdim=True)
        if image_size is not None:
            anomaly_map = F.interpolate(anomaly_map, size=image_size, mode="bilinear", align_corners=False)
        if valid is None:
            return self.blur(anomaly_map)
        weights = valid[:, None].to(anomaly_map.dtype)
        return self.blur(anomaly_map * weights) / self.blur(weights).clamp_min(1e-6) * weights

    def forward(self, **kwargs: torch.Tensor) -> torch.Tensor:
        """anomalib's arguments (``distance``, ``scale``, ``image_size``) plus an optional ``valid`` mask."""
        score = self.compute_score(distance=kwargs["distance"], scale=kwargs["scale"])  # type: ignore[arg-type]
        return self.compute_anomaly_map(score, kwargs.get("image_size"), kwargs.get("valid"))  # type: ignore[arg-type]

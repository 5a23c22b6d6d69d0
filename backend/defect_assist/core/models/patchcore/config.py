"""PatchCore's options (stored in each saved model's metadata)."""

from __future__ import annotations

from dataclasses import dataclass, field

from defect_assist.core.models.config import ModelConfig


@dataclass
class PatchcoreConfig(ModelConfig):
    """PatchCore (Roth et al., 2022) with an offline EfficientNet-Lite backbone and a coverage coreset.

    ``layers``: backbone blocks whose features make a patch; ``balance_layers``: weigh every layer
    equally in the patch distance (see torch_model); ``coverage_quantile``: memory-bank radius;
    ``num_neighbors``: the paper's score re-weighting; ``anomaly_map_sigma``: Gaussian smoothing of
    the map in pixels of a 256 px input (scaled with ``image_size``); ``mask_sigma``: the same for the
    map the served mask is cut from (less smoothing keeps the defects' shape; the anomaly map's σ is
    chosen for ranking); ``max_bank``: bank size cap.
    """

    backbone: str = "tf_efficientnet_lite1"
    layers: list[str] = field(default_factory=lambda: ["blocks.2", "blocks.4"])
    balance_layers: bool = True
    image_size: int = 256
    resize: str = "letterbox"
    coverage_quantile: float = 0.9
    num_neighbors: int = 9
    anomaly_map_sigma: float = 24.0
    mask_sigma: float = 4.0
    max_bank: int = 200_000
    pretrained: bool = True

    @property
    def map_sigma_pixels(self) -> float:
        """``anomaly_map_sigma`` in pixels of the model input (it is given for a 256 px input)."""
        return self.anomaly_map_sigma * self.image_size / 256

    @property
    def mask_sigma_pixels(self) -> float:
        """``mask_sigma`` in pixels of the model input."""
        return self.mask_sigma * self.image_size / 256

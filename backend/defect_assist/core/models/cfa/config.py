"""CFA's options (stored in each saved model's metadata); shared by the served and Lightning models."""

from __future__ import annotations

from dataclasses import dataclass, field

from defect_assist.core.models.config import ModelConfig


@dataclass
class CfaConfig(ModelConfig):
    """CFA (Lee et al., 2022) through anomalib 2.7's ``CfaModel`` with an offline EfficientNet-Lite.

    ``layers``: backbone blocks whose 3x3-pooled features are concatenated at the first one's
    resolution (strides 4, 8, 16, as anomalib's ResNet ``layer1-3``); ``gamma_c`` / ``gamma_d``:
    memory-bank and descriptor compression; ``num_nearest_neighbors`` (K) and
    ``num_hard_negative_features`` (J) and ``radius`` (r): anomalib's loss and map; ``epochs``,
    ``patience`` (epochs without a 1 % gain of the held-out normals' loss before stopping),
    ``time_budget_s``, the AdamW settings of anomalib (``lr``, ``weight_decay``, amsgrad);
    ``position_fraction``: share of the feature grid's positions (drawn anew each step, the same for
    the batch) whose loss a training step computes (1 = anomalib's every position);
    ``anomaly_map_sigma``: Gaussian smoothing in pixels of a 256 px input (anomalib: 4).
    """

    backbone: str = "tf_efficientnet_lite0"
    layers: list[str] = field(default_factory=lambda: ["blocks.1", "blocks.2", "blocks.4"])
    image_size: int = 192
    resize: str = "letterbox"
    pretrained: bool = True
    gamma_c: int = 1
    gamma_d: int = 1
    num_nearest_neighbors: int = 3
    num_hard_negative_features: int = 3
    radius: float = 1e-5
    epochs: int = 30
    patience: int = 5
    time_budget_s: float = 840.0
    train_batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 5e-4
    val_fraction: float = 0.05
    position_fraction: float = 1.0  # 0.25 was 4x cheaper per step but worse on validation (README)
    anomaly_map_sigma: float = 4.0

    @property
    def map_sigma_pixels(self) -> float:
        """``anomaly_map_sigma`` in pixels of the model input (it is given for a 256 px input)."""
        return self.anomaly_map_sigma * self.image_size / 256

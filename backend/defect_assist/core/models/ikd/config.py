"""IKD's options (stored in each saved model's metadata); shared by the served and Lightning models."""

from __future__ import annotations

from dataclasses import dataclass, field

from defect_assist.core.models.config import ModelConfig


@dataclass
class IkdConfig(ModelConfig):
    """IKD (Cao et al., KBS 2022) with an offline EfficientNet-Lite teacher and a same-architecture student.

    ``layers``: backbone blocks whose features are distilled (strides 4, 8, 16 for EfficientNet-Lite);
    ``csl_weight``: λ of the context similarity loss; ``ahsm_alpha``: the hard-pixel threshold
    ``mean + alpha * std`` of AHSM; ``epochs`` / ``time_budget_s`` / ``patience``: the training
    schedule (validation loss on held-out training normals after every epoch, best weights kept,
    stop after ``patience`` epochs without a 1 % gain); ``map_combine``: ``sum`` (mean) or ``product``
    of the per-level maps; ``anomaly_map_sigma``: Gaussian smoothing in pixels of a 256 px input;
    ``score_top_fraction``: image score = mean of this top share of the map (0 = its maximum).
    """

    backbone: str = "tf_efficientnet_lite0"
    layers: list[str] = field(default_factory=lambda: ["blocks.1", "blocks.2", "blocks.4"])
    image_size: int = 160
    resize: str = "letterbox"
    pretrained: bool = True
    epochs: int = 30
    train_batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-5
    csl_weight: float = 1.0
    ahsm_alpha: float = 0.0
    val_fraction: float = 0.05
    patience: int = 5
    time_budget_s: float = 840.0
    map_combine: str = "sum"
    anomaly_map_sigma: float = 8.0
    score_top_fraction: float = 0.0

    @property
    def map_sigma_pixels(self) -> float:
        """``anomaly_map_sigma`` in pixels of the model input (it is given for a 256 px input)."""
        return self.anomaly_map_sigma * self.image_size / 256

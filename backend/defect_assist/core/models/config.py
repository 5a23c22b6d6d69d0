"""Typed model options: one dataclass per model kind, stored in the model's metadata."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Self


@dataclass
class ModelConfig:
    """Options every model has; each model's config adds its own (all with defaults)."""

    backbone: str = "tf_efficientnet_lite1"
    image_size: int | None = 256
    resize: str = "letterbox"  # letterbox | squash (see defect_assist.core.preprocessing)
    # served thresholds: quantiles of the held-out normals' image scores and anomaly-map values; 0.90
    # chosen on the validation half of magnetic-tile test/ (docs/experiments/served-thresholds.md)
    image_quantile: float = 0.90
    pixel_quantile: float = 0.999
    # served mask (defect_assist.core.mask_rule): the floor quantile of normal mask-map values and the
    # share of an image's peak above it that cuts the region (docs/experiments/served-masks.md)
    mask_quantile: float = 0.999
    mask_relative: float = 0.5

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Self:
        """The config with ``options`` over the defaults; unknown names raise ``TypeError``."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown options {unknown}; known: {sorted(names)}")
        return cls(**dict(options))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly values (as stored in ``metadata.json``)."""
        return asdict(self)

"""Thresholds from normal images, and the logistic normalisation that puts them at 0.5."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Calibration:
    """Thresholds and the logistic normalisation ``sigmoid((raw - threshold) / scale)``.

    Rule (normal-only data): the image threshold is the ``image_quantile`` quantile of raw scores of
    held-out normal images (models default to 0.90: recall over a 1-in-10 false alarm on normals);
    the pixel threshold is the ``pixel_quantile`` quantile of their anomaly-map values. Scales are
    the distance from the median to the threshold divided by 3, so a median
    normal maps to sigmoid(-3) ≈ 0.05.
    """

    image_threshold: float = 0.0
    image_scale: float = 1.0
    pixel_threshold: float = 0.0
    pixel_scale: float = 1.0
    image_quantile: float = 0.99
    pixel_quantile: float = 0.999
    n_images: int = 0
    source: str = "held-out normals"

    @staticmethod
    def _scale(median: float, threshold: float) -> float:
        return max((threshold - median) / 3.0, 1e-6)

    @classmethod
    def from_normals(
        cls,
        scores: np.ndarray,
        maps: np.ndarray,
        image_quantile: float = 0.99,
        pixel_quantile: float = 0.999,
        source: str = "held-out normals",
    ) -> Calibration:
        image_threshold = float(np.quantile(scores, image_quantile))
        flat = (
            maps.reshape(-1)
            if maps.size <= 20_000_000
            else np.random.default_rng(0).choice(maps.reshape(-1), 20_000_000)
        )
        pixel_threshold = float(np.quantile(flat, pixel_quantile))
        return cls(
            image_threshold=image_threshold,
            image_scale=cls._scale(float(np.median(scores)), image_threshold),
            pixel_threshold=pixel_threshold,
            pixel_scale=cls._scale(float(np.median(flat)), pixel_threshold),
            image_quantile=image_quantile,
            pixel_quantile=pixel_quantile,
            n_images=len(scores),
            source=source,
        )

    def normalise_score(self, raw: np.ndarray | float) -> np.ndarray:
        return 1.0 / (
            1.0
            + np.exp(
                -np.clip((np.asarray(raw, np.float64) - self.image_threshold) / self.image_scale, -60, 60)
            )
        )

    def normalise_map(self, raw: np.ndarray) -> np.ndarray:
        z = np.clip((raw.astype(np.float32) - self.pixel_threshold) / self.pixel_scale, -60, 60)
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)

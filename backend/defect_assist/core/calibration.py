"""Thresholds from normal images, and the logistic normalisation that puts them at 0.5."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from defect_assist.core.mask_rule import MaskRule


@dataclass
class Calibration:
    """Thresholds and the logistic normalisation ``sigmoid((raw - threshold) / scale)``.

    Rule (normal-only data): the image threshold is the ``image_quantile`` quantile of raw scores of
    held-out normal images (models default to 0.90: recall over a 1-in-10 false alarm on normals);
    the pixel threshold is the ``pixel_quantile`` quantile of their anomaly-map values. Scales are
    the distance from the median to the threshold divided by 3, so a median
    normal maps to sigmoid(-3) ≈ 0.05. The served mask follows :class:`~defect_assist.core.mask_rule.MaskRule`
    on the model's mask map: ``mask_floor`` is the ``mask_quantile`` quantile of the normals' mask-map
    values, ``mask_base`` their median (``None`` in models saved before the rule: their mask is the
    normalised map above 0.5).
    """

    image_threshold: float = 0.0
    image_scale: float = 1.0
    pixel_threshold: float = 0.0
    pixel_scale: float = 1.0
    image_quantile: float = 0.99
    pixel_quantile: float = 0.999
    n_images: int = 0
    source: str = "held-out normals"
    mask_floor: float | None = None
    mask_base: float | None = None
    mask_relative: float = 0.5
    mask_quantile: float = 0.999

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
        mask_maps: np.ndarray | None = None,
        mask_quantile: float = 0.999,
        mask_relative: float = 0.5,
    ) -> Calibration:
        image_threshold = float(np.quantile(scores, image_quantile))
        flat = _sample(maps)
        pixel_threshold = float(np.quantile(flat, pixel_quantile))
        mask_flat = flat if mask_maps is None else _sample(mask_maps)
        return cls(
            image_threshold=image_threshold,
            image_scale=cls._scale(float(np.median(scores)), image_threshold),
            pixel_threshold=pixel_threshold,
            pixel_scale=cls._scale(float(np.median(flat)), pixel_threshold),
            image_quantile=image_quantile,
            pixel_quantile=pixel_quantile,
            n_images=len(scores),
            source=source,
            mask_floor=float(np.quantile(mask_flat, mask_quantile)),
            mask_base=float(np.median(mask_flat)),
            mask_relative=mask_relative,
            mask_quantile=mask_quantile,
        )

    def mask_rule(self) -> MaskRule | None:
        """The served-mask rule (``None`` for a model saved before it: mask = normalised map > 0.5)."""
        if self.mask_floor is None or self.mask_base is None:
            return None
        return MaskRule(self.mask_floor, self.mask_base, self.mask_relative)

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


def _sample(values: np.ndarray, limit: int = 20_000_000) -> np.ndarray:
    """``values`` flattened, or a fixed random sample of ``limit`` of them."""
    flat = values.reshape(-1)
    return flat if flat.size <= limit else np.random.default_rng(0).choice(flat, limit)

"""What a model returns: per-image predictions and embeddings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass
class Prediction:
    """Result for one image. ``error`` is set (and the rest empty) when the image could not be read."""

    source: str
    score: float = math.nan  # normalised: 0.5 = threshold, monotone in the raw score
    raw_score: float = math.nan
    is_anomalous: bool = False
    anomaly_map: np.ndarray | None = None  # HxW float32, normalised like the score (0.5 = pixel threshold)
    mask: np.ndarray | None = None  # HxW bool, the served mask (core.mask_rule; empty when normal)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def label(self) -> str:
        return "anomalous" if self.is_anomalous else "normal"

    def summary(self) -> dict[str, Any]:
        """JSON-friendly fields (no arrays)."""
        out: dict[str, Any] = {"source": self.source, "error": self.error}
        if self.ok:
            out |= {
                "score": round(self.score, 6),
                "raw_score": round(self.raw_score, 6),
                "label": self.label,
                "defect_pixels": int(self.mask.sum()) if self.mask is not None else 0,
            }
        return out


@dataclass
class Embedding:
    """Image embeddings for similarity search, one row per image; every model fills both parts.

    ``pooled`` describes the surface overall (the model's features mean-pooled over the image);
    ``defect`` the most anomalous region (the same features pooled with anomaly weights).
    """

    pooled: torch.Tensor  # (B, D)
    defect: torch.Tensor  # (B, D')


@dataclass
class ImageEmbeddings:
    """:class:`Embedding` of a list of images as arrays; unreadable images get NaN rows and an error."""

    pooled: np.ndarray  # (N, D)
    defect: np.ndarray  # (N, D')
    errors: list[str | None]


def stack_rows(rows: list[np.ndarray | None]) -> np.ndarray:
    """Stack per-image vectors, NaN rows where an image had none."""
    dim = next((r.shape[0] for r in rows if r is not None), 0)
    filled = [r if r is not None else np.full(dim, np.nan, np.float32) for r in rows]
    return np.stack(filled).astype(np.float32) if filled else np.zeros((0, 0), np.float32)

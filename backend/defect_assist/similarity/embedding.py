"""Similarity embeddings from the served anomaly model (one vector per image, cosine distance).

The vector (``EMBEDDING_NAME``) has three L2-normalised parts, concatenated with weights:

* ``global`` — the model's patch features (PatchCore: the locally aware memory-bank features of
  the backbone layers, EfficientNet-Lite0 ``blocks.2`` + ``blocks.4``) mean-pooled over the image:
  what the surface looks like overall;
* ``defect`` — the same patch features pooled with weights ``softmax(patch anomaly score / t)``,
  which concentrates on the most anomalous region: what the defect looks like. Both come from
  ``AnomalyModel.predict_and_embed`` (:class:`~defect_assist.core.models.Embedding`, filled by every
  model, in the same pass as the score);
* ``verdict`` — the model's normalised anomaly score ``s`` (0.5 = threshold) as the unit vector
  ``(cos θ, sin θ)``, ``θ = π/2 · s``, so normal images lean towards normal ones and anomalous ones
  towards anomalous ones.

Generic pooled ImageNet features place a defective tile next to normal tiles of the same texture;
the ``defect`` and ``verdict`` parts fix that (figures in docs/similarity.md). Weights are
``WEIGHTS``; models without ``embed`` support cannot be indexed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from defect_assist.core.images import ImageSource
from defect_assist.core.models.base import AnomalyModel
from defect_assist.core.models.prediction import Prediction

EMBEDDING_NAME = "patch-mean+anomaly-weighted+verdict/v1"
WEIGHTS = {"global": 1.0, "defect": 1.0, "verdict": 1.0}


@dataclass
class EmbedResult:
    """Vectors ``(N, D)`` (NaN rows for unreadable images), normalised scores and per-image errors."""

    vectors: np.ndarray
    scores: np.ndarray
    errors: list[str | None]
    predictions: list[Prediction] = field(default_factory=list)


def _unit(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def verdict_vector(scores: np.ndarray) -> np.ndarray:
    """``(N, 2)`` unit vectors encoding normalised scores (NaN scores give zeros)."""
    theta = np.clip(np.nan_to_num(scores, nan=0.0), 0.0, 1.0) * (math.pi / 2)
    out = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    out[np.isnan(scores)] = 0.0
    return out.astype(np.float32)


def combine(
    global_part: np.ndarray,
    defect_part: np.ndarray,
    scores: np.ndarray,
    weights: dict[str, float] | None = None,
) -> np.ndarray:
    """The similarity vector from its parts (each part L2-normalised, then weighted)."""
    weights = weights or WEIGHTS
    parts = [
        weights["global"] * _unit(global_part),
        weights["defect"] * _unit(defect_part),
        weights["verdict"] * verdict_vector(scores),
    ]
    return np.concatenate(parts, axis=1).astype(np.float32)


class SimilarityEmbedder:
    """Embeds images with one model version for indexing and querying."""

    def __init__(
        self,
        model: AnomalyModel,
        model_version: str = "",
        batch_size: int = 8,
        weights: dict[str, float] | None = None,
    ) -> None:
        self.model = model
        self.model_version = model_version
        self.batch_size = batch_size
        self.weights = weights or WEIGHTS

    def predict(self, images: Sequence[ImageSource]) -> list[Prediction]:
        """The model's predictions only (no embedding pass): for images whose vector is indexed already."""
        return self.model.predict(list(images), batch_size=self.batch_size)

    def embed(self, images: Sequence[ImageSource], keep_predictions: bool = False) -> EmbedResult:
        """Embeddings, scores and errors, in one pass (``AnomalyModel.predict_and_embed``).

        ``keep_predictions`` also returns the full predictions (anomaly maps, masks).
        """
        predictions, embedded = self.model.predict_and_embed(list(images), batch_size=self.batch_size)
        scores = np.array([p.score if p.ok else np.nan for p in predictions], dtype=np.float64)
        errors = [e or p.error for e, p in zip(embedded.errors, predictions, strict=True)]
        vectors = combine(embedded.pooled, embedded.defect, scores, self.weights)
        vectors[[e is not None for e in errors]] = np.nan
        return EmbedResult(vectors, scores, errors, predictions if keep_predictions else [])

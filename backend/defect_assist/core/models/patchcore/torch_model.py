"""PatchCore torch model (no Lightning): anomalib 2.7's PatchCore with a fast memory bank.

Feature extraction, 3x3 local aggregation, multi-layer embedding, the paper's re-weighted image
score and the Gaussian-smoothed anomaly map all come from anomalib's ``PatchcoreModel``; the layers
are weighted as in the reference implementation (:func:`layer_weights`). Two parts are replaced
because anomalib's versions do not finish on a CPU in minutes:

* **Memory bank selection** — anomalib's greedy k-center coreset costs ~0.5 s per selected patch on
  two CPU cores (hours for 650 images). Here the bank is a *coverage coreset*: patches are visited in
  a seeded random order and a patch joins the bank only when no bank patch lies within
  ``radius`` of it, so after selection **every training patch is within ``radius`` of the bank**
  (the same guarantee greedy k-center gives, for a radius chosen up front instead of a size).
  The radius is ``coverage_quantile`` of the distances from sampled patches to their nearest
  neighbour among other sampled patches (see :func:`estimate_radius`). The selection is
  incremental by construction: new normal images are added by the same rule without refitting.
* **Nearest-neighbour search** — exact L2 search with faiss (BLAS) instead of chunked torch matmuls.

The anomaly map is anomalib's (nearest upsampling, Gaussian blur) computed as a normalised
convolution over the image's own pixels when the input was letterboxed (:meth:`valid_smoothing`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import faiss
import numpy as np
import torch
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from torch.nn import functional as F

from defect_assist.core import backbones
from defect_assist.core.progress import ProgressCallback


def _search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    distances, labels = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return np.sqrt(np.maximum(distances, 0.0)), labels


def estimate_radius(features: np.ndarray, quantile: float, sample: int = 20_000, seed: int = 0) -> float:
    """Coverage radius: ``quantile`` of nearest-neighbour distances within a random patch sample."""
    rng = np.random.default_rng(seed)
    count = min(sample, len(features))
    picked = features[rng.choice(len(features), size=count, replace=False)]
    index = faiss.IndexFlatL2(picked.shape[1])
    index.add(np.ascontiguousarray(picked, dtype=np.float32))
    distances, _ = _search(index, picked, 2)
    return float(np.quantile(distances[:, 1], quantile))


def coverage_select(
    features: np.ndarray,
    radius: float,
    bank: np.ndarray | None = None,
    seed: int = 0,
    chunk: int = 4096,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """Indices of ``features`` to add to ``bank`` so that every feature is within ``radius`` of it.

    Coverage is checked with an inverted-file index (:func:`_coverage_index`): its search is
    approximate, but a neighbour it returns is at its true distance, so a miss can only add a
    redundant bank patch — the guarantee holds exactly.
    """
    dim = features.shape[1]
    rng = np.random.default_rng(seed)
    sample = features[rng.choice(len(features), size=min(len(features), 50_000), replace=False)]
    _quantizer, index = _coverage_index(dim, np.ascontiguousarray(sample, dtype=np.float32))
    if bank is not None and len(bank):
        index.add(np.ascontiguousarray(bank, dtype=np.float32))
    order = np.random.default_rng(seed).permutation(len(features))
    selected: list[np.ndarray] = []
    squared = radius * radius
    for start in range(0, len(order), chunk):
        ids = order[start : start + chunk]
        block = np.ascontiguousarray(features[ids], dtype=np.float32)
        if index.ntotal:
            distances, _ = index.search(block, 1)
            keep = distances[:, 0] > squared
            ids, block = ids[keep], block[keep]
        if len(ids):
            leaders = _leaders(torch.from_numpy(block), squared)
            selected.append(ids[leaders])
            index.add(block[leaders])
        if progress:
            progress("coreset", min(start + chunk, len(order)), len(order))
    return np.concatenate(selected) if selected else np.zeros(0, dtype=np.int64)


COVERAGE_NPROBE = 8  # inverted lists searched per query


def _coverage_index(dim: int, sample: np.ndarray) -> tuple[faiss.Index | None, faiss.Index]:
    """A flat index for small inputs, else IVF-flat (up to 256 k-means lists trained on ``sample``).

    Returns ``(quantizer, index)``; the caller keeps the quantizer alive while using the index.
    """
    lists = min(256, len(sample) // 200)
    if lists < 32:
        return None, faiss.IndexFlatL2(dim)
    quantizer = faiss.IndexFlatL2(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, lists)
    index.train(sample)
    index.nprobe = COVERAGE_NPROBE
    return quantizer, index


def _leaders(block: torch.Tensor, squared_radius: float) -> np.ndarray:
    """Greedy leader clustering inside a block: visit in order, keep a point unless a kept one covers it."""
    uncovered = torch.ones(len(block), dtype=torch.bool)
    norms = (block * block).sum(1)
    kept = []
    position = 0
    while True:
        remaining = torch.nonzero(uncovered[position:], as_tuple=False)
        if len(remaining) == 0:
            break
        position = position + int(remaining[0])
        kept.append(position)
        distances = norms - 2 * (block @ block[position]) + norms[position]
        uncovered &= distances > squared_radius
    return np.asarray(kept, dtype=np.int64)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """The Gaussian blur of anomalib's ``GaussianBlur2d`` (radius 4σ, reflect padding), done separably.

    Same result as the 2-D kernel (it is the outer product of two 1-D ones) at ``2k`` instead of
    ``k²`` multiplications per pixel, so a large σ costs little.
    """
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma * sigma))
    kernel = kernel / kernel.sum()
    mode = "reflect" if radius < min(maps.shape[-2:]) else "replicate"
    padded = F.pad(maps, (radius, radius, radius, radius), mode=mode)
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))


def layer_weights(channels: dict[str, int], balance: bool = True) -> dict[str, float]:
    """Per-layer feature scale: ``sqrt(mean channels / channels)`` when balancing, else 1.

    The reference PatchCore implementation projects every layer's patch features to one common
    dimension (adaptive average pooling) before concatenating, so each layer weighs the same in the
    patch distance whatever its channel count; a channel of a 40-channel layer counts 112/40 times as
    much as one of a 112-channel layer. anomalib concatenates the raw channels instead, letting the
    wider (deeper) layer dominate. Scaling by ``1/sqrt(channels)`` restores the reference weighting
    without the projection (the squared distance of a layer is divided by its channel count).
    """
    if not balance:
        return dict.fromkeys(channels, 1.0)
    mean = sum(channels.values()) / len(channels)
    return {layer: math.sqrt(mean / count) for layer, count in channels.items()}


class FastPatchcoreModel(PatchcoreModel):
    """anomalib's PatchcoreModel with offline backbone weights, coverage coreset and faiss search."""

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[str] = ("blocks.2", "blocks.4"),
        pretrained: bool = True,
        num_neighbors: int = 9,
        anomaly_map_sigma: float = 8.0,
        coverage_quantile: float = 0.9,
        balance_layers: bool = True,
    ) -> None:
        spec = backbones.get_spec(backbone)
        super().__init__(
            layers=list(layers), backbone=spec.timm_name, pre_trained=False, num_neighbors=num_neighbors
        )
        if pretrained:
            backbones.load_into(self.feature_extractor.feature_extractor, backbone)
        # channels-last runs the depthwise convolutions of EfficientNet ~1.6x faster on CPU (oneDNN)
        self.feature_extractor.to(memory_format=torch.channels_last)
        if anomaly_map_sigma != 4.0:
            from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator

            self.anomaly_map_generator = AnomalyMapGenerator(sigma=int(anomaly_map_sigma))
        self.anomaly_map_sigma = float(anomaly_map_sigma)
        self._index: faiss.Index | None = None
        self.radius: float = 0.0
        self.coverage_quantile = coverage_quantile
        self.layer_channels = dict(zip(self.layers, self.feature_extractor.out_dims, strict=True))
        self.layer_weights = layer_weights(self.layer_channels, balance_layers)

    # --------------------------------------------------------------- features
    @torch.no_grad()
    def patch_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features ``(B, D, h, w)`` (anomalib's pooling + layer concatenation)."""
        features = self.feature_extractor(images.contiguous(memory_format=torch.channels_last))
        features = {layer: self.feature_pooler(feature) for layer, feature in features.items()}
        return self.generate_embedding(features)

    def channel_weights(self) -> torch.Tensor:
        """The :attr:`layer_weights` of every embedding channel, in embedding order ``(D,)``."""
        return torch.cat(
            [
                torch.full((channels,), self.layer_weights[layer])
                for layer, channels in self.layer_channels.items()
            ]
        )

    def generate_embedding(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """anomalib's layer concatenation, each layer first scaled by :attr:`layer_weights`."""
        weighted = {layer: feature * self.layer_weights[layer] for layer, feature in features.items()}
        return super().generate_embedding(weighted)

    # --------------------------------------------------------------- memory bank
    def set_memory_bank(self, bank: torch.Tensor) -> None:
        self.memory_bank = bank.contiguous()
        self._index = None

    def _faiss_index(self) -> faiss.Index:
        if self._index is None or self._index.ntotal != self.memory_bank.shape[0]:
            index = faiss.IndexFlatL2(self.memory_bank.shape[1])
            index.add(np.ascontiguousarray(self.memory_bank.float().cpu().numpy()))
            self._index = index
        return self._index

    def nearest_neighbors(
        self, embedding: torch.Tensor, n_neighbors: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact nearest neighbours in the memory bank via faiss (distances, indices)."""
        distances, labels = _search(self._faiss_index(), embedding.float().cpu().numpy(), n_neighbors)
        device = embedding.device
        return torch.from_numpy(distances).to(device), torch.from_numpy(labels).to(device)

    def subsample_embedding(
        self, sampling_ratio: float | None = None, embeddings: torch.Tensor | None = None
    ) -> None:
        """Build the memory bank from ``embedding_store`` with the coverage coreset.

        Replaces anomalib's k-center greedy (used by the Lightning ``fit`` hook); ``sampling_ratio`` is
        ignored: the bank size follows from the coverage radius.
        """
        del sampling_ratio, embeddings
        if not self.embedding_store:
            raise ValueError("Embedding store is empty. Cannot perform coreset selection.")
        features = torch.vstack(self.embedding_store).float().cpu().numpy()
        self.embedding_store.clear()
        self.radius = estimate_radius(features, self.coverage_quantile)
        selected = coverage_select(features, self.radius)
        device = self.memory_bank.device
        self.set_memory_bank(torch.from_numpy(features[selected]).to(device))

    # --------------------------------------------------------------- inference
    @torch.no_grad()
    def score(
        self, images: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image scores ``(B,)``, anomaly maps ``(B, H, W)`` and patch scores ``(B, h, w)``.

        ``valid`` (``B x H x W`` bool, optional) marks real image pixels (letterbox padding is
        ``False``); patches outside it are ignored for the image score.
        """
        embedding = self.patch_embedding(images)
        batch, _, height, width = embedding.shape
        flat = self.reshape_embedding(embedding)
        patch_scores, locations = self.nearest_neighbors(flat, n_neighbors=1)
        patch_scores = patch_scores.reshape(batch, -1)
        locations = locations.reshape(batch, -1)
        scoring = patch_scores
        if valid is not None:
            patch_valid = (
                F.adaptive_max_pool2d(valid[:, None].float(), (height, width)).reshape(batch, -1) > 0
            )
            scoring = torch.where(patch_valid, patch_scores, torch.zeros_like(patch_scores))
        image_scores = self.compute_anomaly_score(scoring, locations, flat)
        grid = patch_scores.reshape(batch, 1, height, width)
        if valid is None:
            upsampled = F.interpolate(grid, size=images.shape[-2:])  # as anomalib's AnomalyMapGenerator
            anomaly_map = gaussian_blur(upsampled, self.anomaly_map_sigma)
        else:
            anomaly_map = self.valid_smoothing(grid, valid)
        return image_scores, anomaly_map[:, 0], grid[:, 0]

    def valid_smoothing(self, grid: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """anomalib's map (nearest upsampling + Gaussian blur) as a normalised convolution over image pixels.

        ``blur(map * valid) / blur(valid)``: letterbox padding (scored low, being in every training
        image) does not dilute the scores along the image border.
        """
        upsampled = F.interpolate(grid, size=valid.shape[-2:])
        weights = valid[:, None].to(upsampled.dtype)
        sigma = self.anomaly_map_sigma
        smoothed = gaussian_blur(upsampled * weights, sigma) / gaussian_blur(weights, sigma).clamp_min(1e-6)
        return smoothed * weights

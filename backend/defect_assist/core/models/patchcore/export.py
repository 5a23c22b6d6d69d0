"""The served PatchCore forward as one traceable graph, for ONNX and OpenVINO export.

:class:`PatchcoreServingGraph` holds everything a served prediction needs up to the per-image mask
cut: ImageNet normalisation, the backbone, the patch embedding, the nearest-neighbour search against
the memory bank (a matrix product and a ``min``, which every runtime supports, instead of faiss), the
paper's re-weighted image score (anomalib's ``compute_anomaly_score`` with that search), the anomaly
and mask maps, and the calibration: the normalised score (a sigmoid around the image threshold) and
the verdict. Its outputs are the torch model's (:meth:`PatchcoreAnomalyModel._infer_with_patch_inputs`)
plus ``score`` and ``is_anomalous``, so a runtime can stand in for the eager model without changing
what is served.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from defect_assist.core.models.patchcore.anomaly_model import PatchcoreAnomalyModel

INPUT_NAMES = ("image", "valid")
OUTPUT_NAMES = ("raw_score", "score", "is_anomalous", "anomaly_map", "mask_map", "patch_inputs")


class PatchcoreServingGraph(nn.Module):
    """Images ``(B, 3, S, S)`` in [0, 1] RGB and valid pixels ``(B, S, S)`` (1 = image, 0 = letterbox)
    to the outputs of :data:`OUTPUT_NAMES`."""

    input_names = INPUT_NAMES
    output_names = OUTPUT_NAMES
    bank: torch.Tensor
    bank_norms: torch.Tensor

    def __init__(self, model: PatchcoreAnomalyModel) -> None:
        super().__init__()
        if model.calibration is None:
            raise ValueError("only a calibrated (fitted) model can be exported")
        self.net = model.model
        self.mask_map_generator = model.mask_map_generator
        bank = model.model.memory_bank.detach().float().cpu()
        self.register_buffer("bank", bank)
        self.register_buffer("bank_norms", (bank * bank).sum(dim=1))
        self.register_buffer("mean", torch.tensor(model.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.image_threshold = float(model.calibration.image_threshold)
        self.image_scale = float(model.calibration.image_scale)
        self.num_neighbors = min(int(model.model.num_neighbors), int(bank.shape[0]))
        size = model.image_size
        with torch.no_grad():  # the patch grid, as Python ints: traced shapes would make it dynamic
            probe = self.net.patch_embedding(torch.zeros(1, 3, size, size, device=bank.device))
        self.image_size, self.grid = size, (int(probe.shape[-2]), int(probe.shape[-1]))

    def nearest(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distances ``(N, k)`` to the ``k`` nearest bank rows and their indices."""
        squared = (
            (queries * queries).sum(dim=1, keepdim=True) - 2.0 * queries @ self.bank.T + self.bank_norms[None]
        )
        if k == 1:
            values, indices = squared.min(dim=1, keepdim=True)
        else:
            values, indices = torch.topk(squared, k, dim=1, largest=False)
        return values.clamp_min(0.0).sqrt(), indices

    def image_scores(
        self, patch_scores: torch.Tensor, locations: torch.Tensor, flat: torch.Tensor
    ) -> torch.Tensor:
        """anomalib's ``compute_anomaly_score`` (the paper's re-weighting) with :meth:`nearest`."""
        if self.num_neighbors == 1:
            return patch_scores.amax(dim=1)
        patches = self.grid[0] * self.grid[1]
        rows = torch.arange(patch_scores.shape[0])
        worst = patch_scores.argmax(dim=1)
        worst_features = flat.reshape(-1, patches, flat.shape[1])[rows, worst]
        score = patch_scores[rows, worst]
        nearest_bank_rows = self.bank[locations[rows, worst]]
        _, support = self.nearest(nearest_bank_rows, self.num_neighbors)
        distances = torch.linalg.vector_norm(worst_features[:, None] - self.bank[support], dim=-1)
        weights = 1.0 - F.softmax(distances, dim=1)[:, 0]
        return weights * score

    def forward(self, image: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embedding = self.net.patch_embedding((image - self.mean) / self.std)
        height, width = self.grid
        patches = height * width
        flat = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
        distances, locations = self.nearest(flat, 1)
        patch_scores = distances.reshape(-1, patches)
        patch_valid = F.adaptive_max_pool2d(valid[:, None], self.grid).reshape(-1, patches) > 0
        scoring = torch.where(patch_valid, patch_scores, torch.zeros_like(patch_scores))
        raw_score = self.image_scores(scoring, locations.reshape(-1, patches), flat)
        grid = patch_scores.reshape(-1, 1, height, width)
        valid_pixels = valid > 0.5
        size = (self.image_size, self.image_size)
        anomaly_map = self.net.anomaly_map_generator(grid, size, valid_pixels)[:, 0]
        mask_map = self.mask_map_generator(grid, None, valid_pixels)[:, 0]
        peak = grid.flatten(1).amax(dim=1).clamp_min(1e-6)[:, None, None, None]
        patch_inputs = torch.cat([embedding, grid, grid / peak], dim=1)
        z = ((raw_score - self.image_threshold) / self.image_scale).clamp(-60.0, 60.0)
        score = torch.sigmoid(z)
        return raw_score, score, score >= 0.5, anomaly_map, mask_map, patch_inputs

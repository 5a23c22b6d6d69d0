"""PatchCore behind the project's :class:`~defect_assist.core.models.base.AnomalyModel` interface."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional as F

from defect_assist.core.models.base import AnomalyModel
from defect_assist.core.models.patchcore.anomaly_map import AnomalyMapGenerator
from defect_assist.core.models.patchcore.config import PatchcoreConfig
from defect_assist.core.models.patchcore.export import PatchcoreServingGraph
from defect_assist.core.models.patchcore.torch_model import FastPatchcoreModel
from defect_assist.core.models.prediction import Embedding
from defect_assist.core.progress import ProgressCallback


class PatchcoreAnomalyModel(AnomalyModel):
    """PatchCore (Roth et al., 2022) behind the model interface; options: :class:`PatchcoreConfig`."""

    kind: ClassVar[str] = "patchcore"
    supports_incremental: ClassVar[bool] = True
    supports_corrections: ClassVar[bool] = True
    config_class: ClassVar[type[PatchcoreConfig]] = PatchcoreConfig
    config: PatchcoreConfig
    saved_model_defaults: ClassVar[dict[str, Any]] = {"balance_layers": False}

    def __init__(self, device: str = "auto", **config: Any) -> None:
        super().__init__(device=device, **config)
        self.model = FastPatchcoreModel.from_config(self.config).to(self.device).eval()
        self.mask_map_generator = AnomalyMapGenerator(self.config.mask_sigma_pixels).to(self.device)

    # ------------------------------------------------------------------ fitting
    def _collect(
        self, batches: Callable[[], Iterator[torch.Tensor]], n_images: int, progress: ProgressCallback
    ) -> np.ndarray:
        chunks, done = [], 0
        for batch in batches():
            embedding = self.model.patch_embedding(batch)
            chunks.append(self.model.reshape_embedding(embedding).float().cpu().numpy())
            done += len(batch)
            progress("features", done, n_images)
        return np.concatenate(chunks)

    def _fit(
        self, batches: Callable[[], Iterator[torch.Tensor]], n_images: int, progress: ProgressCallback
    ) -> dict[str, Any]:
        started = time.perf_counter()
        features = self._collect(batches, n_images, progress)
        extracted = time.perf_counter()
        bank_size = self.model.fit_memory_bank(features, progress=progress)
        return {
            "patch_features": len(features),
            "memory_bank": bank_size,
            "coverage_radius": round(self.model.radius, 5),
            "feature_seconds": round(extracted - started, 2),
            "coreset_seconds": round(time.perf_counter() - extracted, 2),
        }

    def _extend(
        self, batches: Callable[[], Iterator[torch.Tensor]], n_images: int, progress: ProgressCallback
    ) -> dict[str, Any]:
        features = self._collect(batches, n_images, progress)
        added = self.model.extend_memory_bank(features, progress=progress)
        return {"added_patches": added, "memory_bank": int(self.model.memory_bank.shape[0])}

    # ------------------------------------------------------------------ inference
    def _infer(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps, _ = self.model.score(tensor)
        return scores, maps

    def _infer_valid(self, tensor: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps, _ = self.model.score(tensor, valid)
        return scores, maps

    def _infer_with_mask_maps(
        self, tensor: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores, the σ-smoothed anomaly maps and the ``mask_sigma``-smoothed maps of one patch grid."""
        if self.runtime is not None:
            return self._run_export(tensor, valid)[:3]
        scores, maps, grid = self.model.score(tensor, valid)
        return scores, maps, self.mask_map_generator(grid[:, None], None, valid)[:, 0]

    def _run_export(self, tensor: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`_infer_with_patch_inputs` through the attached export (:mod:`defect_assist.core.export`)."""
        mean = torch.tensor(self.mean, device=tensor.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=tensor.device).view(1, 3, 1, 1)
        image = (tensor.float() * std + mean).cpu().numpy()
        outputs = self.runtime.run(image, valid.float().cpu().numpy())
        names = ("raw_score", "anomaly_map", "mask_map", "patch_inputs")
        return tuple(torch.from_numpy(outputs[name]).to(tensor.device) for name in names)

    def serving_graph(self) -> PatchcoreServingGraph:
        return PatchcoreServingGraph(self)

    def _infer_with_patch_inputs(
        self, tensor: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores, maps, mask maps and the patch inputs: features, patch score, score / image peak."""
        if self.runtime is not None:
            return self._run_export(tensor, valid)  # type: ignore[return-value]
        embedding = self.model.patch_embedding(tensor)
        scores, maps, grid = self.model.score_embedding(embedding, tensor.shape[-2:], valid)
        mask_maps = self.mask_map_generator(grid[:, None], None, valid)[:, 0]
        peak = grid.flatten(1).max(dim=1).values.clamp_min(1e-6)[:, None, None]
        inputs = torch.cat([embedding, grid[:, None], (grid / peak)[:, None]], dim=1)
        return scores, maps, mask_maps, inputs

    @torch.no_grad()
    def embed(self, tensor: torch.Tensor) -> Embedding:
        """Patch embeddings (the memory-bank features) pooled two ways, each L2-normalised.

        ``pooled`` is their mean over the image; ``defect`` pools them with weights
        ``softmax(patch score / t)`` (``t`` = the calibrated pixel scale), so it describes the most
        anomalous region. Both pool the raw channels: layer balancing is for patch distances.
        """
        embedding = self.model.patch_embedding(tensor)  # B x D x h x w
        batch, _, height, width = embedding.shape
        patch_scores, _ = self.model.nearest_neighbors(self.model.reshape_embedding(embedding), n_neighbors=1)
        return self._pool(embedding, patch_scores.reshape(batch, height, width))

    def _embed_patch_inputs(self, inputs: torch.Tensor) -> Embedding:
        return self._pool(inputs[:, :-2], inputs[:, -2])

    def _pool(self, embedding: torch.Tensor, patch_scores: torch.Tensor) -> Embedding:
        """:meth:`embed` from patch embeddings ``(B, D, h, w)`` and their patch scores ``(B, h, w)``."""
        channel_weights = self.model.channel_weights().to(embedding)
        pooled = F.normalize(embedding.mean(dim=(2, 3)) / channel_weights, dim=1)
        batch, dim, height, width = embedding.shape
        temperature = self.calibration.pixel_scale if self.calibration else 1.0
        weights = torch.softmax(patch_scores.reshape(batch, -1) / max(temperature, 1e-6), dim=1)
        flat = embedding.permute(0, 2, 3, 1).reshape(batch, height * width, dim)
        weighted = torch.einsum("bn,bnd->bd", weights, flat)
        return Embedding(pooled=pooled, defect=F.normalize(weighted / channel_weights, dim=1))

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, Any]:
        return {"memory_bank": self.model.memory_bank.cpu(), "radius": self.model.radius}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.set_memory_bank(state["memory_bank"].to(self.device))
        self.model.radius = float(state["radius"])

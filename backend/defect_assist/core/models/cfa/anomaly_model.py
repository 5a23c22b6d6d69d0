"""CFA behind the project's :class:`~defect_assist.core.models.base.AnomalyModel` interface."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from defect_assist.core.models.base import AnomalyModel
from defect_assist.core.models.cfa.config import CfaConfig
from defect_assist.core.models.cfa.torch_model import OfflineCfaModel
from defect_assist.core.models.cfa.trainer import DescriptorTrainer
from defect_assist.core.models.prediction import Embedding
from defect_assist.core.progress import ProgressCallback


class CfaAnomalyModel(AnomalyModel):
    """CFA (Lee et al., 2022) with anomalib's ``CfaModel`` on an offline backbone; :class:`CfaConfig`.

    A saved model stores the descriptor and the memory bank; the backbone comes from the offline
    weights package at construction.
    """

    kind: ClassVar[str] = "cfa"
    config_class: ClassVar[type[CfaConfig]] = CfaConfig
    config: CfaConfig

    def __init__(self, device: str = "auto", **config: Any) -> None:
        super().__init__(device=device, **config)
        if self.image_size < 32 or self.image_size % 16:
            raise ValueError("CFA needs image_size >= 32 and a multiple of 16 (feature strides)")
        self.model = OfflineCfaModel.from_config(self.config).to(self.device).eval()

    # ------------------------------------------------------------------ fitting
    def _fit(
        self, batches: Callable[[], Iterator[torch.Tensor]], n_images: int, progress: ProgressCallback
    ) -> dict[str, Any]:
        started, features, done = time.perf_counter(), [], 0
        for batch in batches():
            features += [f[None].half() for f in self.model.patch_features(batch)]
            done += len(batch)
            progress("features", done, n_images)
        extracted = time.perf_counter()
        trainer = DescriptorTrainer(self.model, self.config, self.device, progress)
        trainer.setup(features)
        trainer.run()
        return {
            "feature_seconds": round(extracted - started, 1),
            "memory_bank": list(self.model.memory_bank.shape),
        } | trainer.summary()

    # ------------------------------------------------------------------ inference
    def _infer(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.score(tensor)

    def _infer_valid(self, tensor: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps smoothed over the image's own pixels; the score ignores letterbox padding."""
        return self.model.score(tensor, valid)

    @torch.no_grad()
    def embed(self, tensor: torch.Tensor) -> Embedding:
        """Target-oriented (descriptor) features pooled two ways, L2-normalised.

        ``pooled``: their mean over the image; ``defect``: weighted by the anomaly map (shifted to be
        positive), so it describes the most anomalous region.
        """
        target = self.model.descriptor(self.model.feature_extractor(tensor))
        _, maps = self.model.score(tensor)
        weights = F.adaptive_avg_pool2d(maps[:, None], target.shape[-2:])
        weights = weights - weights.amin(dim=(-2, -1), keepdim=True) + 1e-6
        defect = (target * weights).sum(dim=(-2, -1)) / weights.sum(dim=(-2, -1))
        return Embedding(
            pooled=F.normalize(target.mean(dim=(-2, -1)), dim=1), defect=F.normalize(defect, dim=1)
        )

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, Any]:
        return {
            "descriptor": {k: v.cpu() for k, v in self.model.descriptor.state_dict().items()},
            "memory_bank": self.model.memory_bank.cpu(),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.descriptor.load_state_dict(state["descriptor"])
        self.model.memory_bank = state["memory_bank"].to(self.device)
        self.model.to(self.device).eval()

"""IKD behind the project's :class:`~defect_assist.core.models.base.AnomalyModel` interface."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from defect_assist.core.models.base import AnomalyModel
from defect_assist.core.models.ikd.config import IkdConfig
from defect_assist.core.models.ikd.torch_model import IkdModel
from defect_assist.core.models.ikd.trainer import StudentTrainer
from defect_assist.core.models.prediction import Embedding
from defect_assist.core.progress import ProgressCallback


class IkdAnomalyModel(AnomalyModel):
    """IKD (Cao et al., KBS 2022): student-teacher distillation with CSL and AHSM; :class:`IkdConfig`.

    The teacher's weights come from the offline backbone package at construction; a saved model
    stores only the student (and its config).
    """

    kind: ClassVar[str] = "ikd"
    config_class: ClassVar[type[IkdConfig]] = IkdConfig
    config: IkdConfig

    def __init__(self, device: str = "auto", **config: Any) -> None:
        super().__init__(device=device, **config)
        if self.image_size < 32 or self.image_size % 16:
            raise ValueError("IKD needs image_size >= 32 and a multiple of 16 (feature strides)")
        self.model = IkdModel.from_config(self.config).to(self.device).eval()

    # ------------------------------------------------------------------ fitting
    def _fit(
        self, batches: Callable[[], Iterator[torch.Tensor]], n_images: int, progress: ProgressCallback
    ) -> dict[str, Any]:
        started = time.perf_counter()
        # Normalised training images stay in memory as half tensors (600 images at 256 px ≈ 240 MB).
        images = [image[None].half() for batch in batches() for image in batch]
        loaded = time.perf_counter()
        trainer = StudentTrainer(self.model, self.config, self.device, progress)
        trainer.setup(images)
        trainer.run()
        return {"load_seconds": round(loaded - started, 1)} | trainer.summary()

    # ------------------------------------------------------------------ inference
    def _infer(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.score(tensor)

    def _infer_valid(self, tensor: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps smoothed over the image's own pixels; the score ignores letterbox padding."""
        return self.model.score(tensor, valid)

    @torch.no_grad()
    def embed(self, tensor: torch.Tensor) -> Embedding:
        """Teacher features of every level (pooled to the deepest grid) pooled two ways, L2-normalised.

        ``pooled``: their mean over the image; ``defect``: weighted by the anomaly map (shifted to be
        positive), so it describes the most anomalous region.
        """
        teacher, _ = self.model.features(tensor)
        grid = teacher[-1].shape[-2:]
        features = torch.cat([F.adaptive_avg_pool2d(F.normalize(t, dim=1), grid) for t in teacher], dim=1)
        _, maps = self.model.score(tensor)
        weights = F.adaptive_avg_pool2d(maps[:, None], grid)
        weights = weights - weights.amin(dim=(-2, -1), keepdim=True) + 1e-6
        defect = (features * weights).sum(dim=(-2, -1)) / weights.sum(dim=(-2, -1))
        return Embedding(
            pooled=F.normalize(features.mean(dim=(-2, -1)), dim=1), defect=F.normalize(defect, dim=1)
        )

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, Any]:
        return {"student": {k: v.cpu() for k, v in self.model.student.state_dict().items()}}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.student.load_state_dict(state["student"])
        self.model.to(self.device).eval()

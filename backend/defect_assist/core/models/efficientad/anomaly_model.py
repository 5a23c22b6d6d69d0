"""EfficientAd behind the project's :class:`~defect_assist.core.models.base.AnomalyModel` interface."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch

from defect_assist.core.models.base import AnomalyModel
from defect_assist.core.models.efficientad.config import EfficientAdConfig
from defect_assist.core.models.efficientad.penalty import PenaltyImages
from defect_assist.core.models.efficientad.teacher.paths import TeacherInfo, natural_images_dir
from defect_assist.core.models.efficientad.teacher.resolve import configured_teacher
from defect_assist.core.models.efficientad.torch_model import OfflineEfficientAdModel, build_model
from defect_assist.core.models.efficientad.trainer import StudentTrainer
from defect_assist.core.models.prediction import Embedding
from defect_assist.core.progress import ProgressCallback

logger = logging.getLogger(__name__)


class EfficientAdAnomalyModel(AnomalyModel):
    """EfficientAd (Batzner et al., WACV 2024) trained offline with anomalib 2.7's network and losses.

    Options: :class:`~defect_assist.core.models.efficientad.config.EfficientAdConfig`, resolved for
    the device (``schedule=auto``: paper on CUDA, cpu otherwise). Inputs reach the networks as [0, 1]
    RGB: anomalib's PDN and autoencoder apply ImageNet normalisation themselves, so the base class's
    normalisation is the identity here.
    """

    kind: ClassVar[str] = "efficientad"
    config_class: ClassVar[type[EfficientAdConfig]] = EfficientAdConfig
    config: EfficientAdConfig
    saved_model_defaults: ClassVar[dict[str, Any]] = {"map_border": "zeros"}

    def __init__(self, device: str = "auto", **config: Any) -> None:
        super().__init__(device=device, **config)
        self.config = self.config.resolved(cuda=self.device.type == "cuda")
        if self.image_size < 128 or self.image_size % 32:  # decoder upsampling grid
            raise ValueError("EfficientAd needs image_size >= 128 and a multiple of 32")
        # anomalib normalises inside the networks; feed [0, 1] pixels.
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        self.teacher_info: TeacherInfo | None = None
        self.model = self._build(None)
        self.model.eval()

    def _build(self, teacher: TeacherInfo | None) -> OfflineEfficientAdModel:
        cfg = self.config
        model = build_model(cfg.model_size, teacher, cfg.padding, cfg.pad_maps, cfg.map_border)
        return model.to(self.device)

    # ------------------------------------------------------------------ fitting
    def _fit(
        self, batches: Callable[[], Iterator[torch.Tensor]], n_images: int, progress: ProgressCallback
    ) -> dict[str, Any]:
        started = time.perf_counter()
        self.teacher_info = configured_teacher(self.config)
        self.model = self._build(self.teacher_info)
        teacher_seconds = time.perf_counter() - started
        # Training images stay in memory as half-precision [0, 1] tensors (650 images at 256 px ≈ 250 MB).
        images = [image[None].half() for batch in batches() for image in batch]
        penalty = PenaltyImages(
            self.config.penalty_dir or natural_images_dir(),
            self.image_size,
            seed=int(torch.initial_seed()) % 2**31,
        )
        trainer = StudentTrainer(self.model, self.config, self.device, progress)
        trainer.setup(images, penalty)
        trainer.run()
        return self._teacher_details(teacher_seconds) | trainer.summary()

    def _teacher_details(self, seconds: float) -> dict[str, Any]:
        info = self.teacher_info
        assert info is not None
        return {
            "teacher": info.source,
            "teacher_path": str(info.path) if info.path else None,
            "teacher_heldout_regression_error": info.provenance.get("heldout_regression_error"),
            "teacher_seconds": round(seconds, 1),
        }

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def _infer(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model(tensor)
        maps = output.anomaly_map[:, 0]
        return maps.amax(dim=(-2, -1)), maps

    @torch.no_grad()
    def _infer_valid(self, tensor: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image score = maximum of the map over the image's own pixels (letterbox padding excluded)."""
        _, maps = self._infer(tensor)
        masked = torch.where(valid, maps, torch.full_like(maps, -math.inf))
        return masked.amax(dim=(-2, -1)), maps

    @torch.no_grad()
    def embed(self, tensor: torch.Tensor) -> Embedding:
        """Teacher features (channel-standardised) pooled over the image, and weighted by the anomaly map."""
        features = self.model._normalize_teacher(self.model.teacher(tensor))
        _, maps = self._infer(tensor)
        weights = torch.nn.functional.adaptive_avg_pool2d(maps[:, None], features.shape[-2:])
        weights = weights.clamp_min(0) + 1e-6
        defect = (features * weights).sum(dim=(-2, -1)) / weights.sum(dim=(-2, -1))
        return Embedding(pooled=features.mean(dim=(-2, -1)), defect=defect)

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, Any]:
        info = self.teacher_info
        return {
            "model": {k: v.cpu() for k, v in self.model.state_dict().items()},
            "teacher": {
                "source": info.source,
                "path": str(info.path) if info and info.path else None,
                "provenance": info.provenance,
            }
            if info
            else None,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.model.to(self.device).eval()
        teacher = state.get("teacher")
        if teacher:
            path = Path(teacher["path"]) if teacher.get("path") else None
            self.teacher_info = TeacherInfo(
                self.config.model_size, teacher["source"], path, teacher.get("provenance") or {}
            )

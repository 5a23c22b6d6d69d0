"""EfficientAd behind the project's :class:`~defect_assist.core.models.base.AnomalyModel` interface."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch

from defect_assist.core.models.base import AnomalyModel
from defect_assist.core.models.efficientad.config import EfficientAdConfig
from defect_assist.core.models.efficientad.teacher import TeacherInfo, resolve_teacher
from defect_assist.core.models.efficientad.torch_model import (
    OfflineEfficientAdModel,
    PenaltyImages,
    build_model,
    map_norm_quantiles,
    teacher_channel_mean_std,
    validation_loss,
)
from defect_assist.core.models.prediction import Embedding
from defect_assist.core.progress import ProgressCallback

logger = logging.getLogger(__name__)


class EfficientAdAnomalyModel(AnomalyModel):
    """EfficientAd (Batzner et al., WACV 2024) trained offline with anomalib 2.7's network and losses.

    Options: ``model_size`` (small | medium), ``teacher`` (auto | official | distilled | random | path
    to a .pth), ``teacher_data`` (natural images to distil from; default ``<DATASETS_DIR>/imagenet_sample``),
    ``penalty_dir`` (ImageFolder of natural images for the penalty loss; same default), ``schedule``
    (auto = paper on CUDA, cpu otherwise), and the schedule's values, each overridable: ``image_size``,
    ``max_steps``, ``lr``, ``val_every`` (steps between validation checks, 0 = never), ``patience``
    (checks without >1 % improvement before stopping early, 0 = never), ``time_budget_s`` (0 = none);
    ``resize`` (squash, as anomalib, or letterbox) and ``map_border`` (replicate, or anomalib's zeros).
    Inputs reach the networks as [0, 1] RGB: anomalib's PDN and autoencoder apply ImageNet
    normalisation themselves, so the base class's normalisation is the identity here.
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

    # ------------------------------------------------------------------ helpers
    def _build(self, teacher: TeacherInfo | None) -> OfflineEfficientAdModel:
        cfg = self.config
        model = build_model(cfg.model_size, teacher, cfg.padding, cfg.pad_maps, cfg.map_border)
        return model.to(self.device)

    def _datasets_dir(self) -> Path:
        from defect_assist.core.settings import get_settings

        return get_settings().datasets_dir

    def _resolve_teacher(self) -> TeacherInfo:
        return resolve_teacher(
            self.config.model_size,
            self.config.teacher,
            model_dir=self.config.model_dir,
            data=self.config.teacher_data or self._datasets_dir() / "imagenet_sample",
            distill_overrides={"backbone": self.config.backbone},
        )

    # ------------------------------------------------------------------ fitting
    def _fit(
        self, batches: Callable[[], Iterator[torch.Tensor]], n_images: int, progress: ProgressCallback
    ) -> dict[str, Any]:
        started = time.perf_counter()
        cfg = self.config
        self.teacher_info = self._resolve_teacher()
        self.model = self._build(self.teacher_info)
        teacher_seconds = time.perf_counter() - started

        # Training images stay in memory as half-precision [0, 1] tensors (650 images at 256 px ≈ 250 MB).
        images = [image[None].half() for batch in batches() for image in batch]
        n_val = 0 if len(images) < 20 else max(5, min(50, round(len(images) * cfg.val_fraction)))
        val = [im.float() for im in images[:n_val]]
        train = images[n_val:]
        penalty = PenaltyImages(
            cfg.penalty_dir or self._datasets_dir() / "imagenet_sample",
            self.image_size,
            seed=int(torch.initial_seed()) % 2**31,
        )

        self.model.eval()
        self.model.mean_std.update(teacher_channel_mean_std(self.model, [im.float() for im in train]))
        optimizer = torch.optim.Adam(
            list(self.model.student.parameters()) + list(self.model.ae.parameters()),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
        )
        max_steps = cfg.max_steps
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=max(int(0.95 * max_steps), 1), gamma=0.1
        )

        self.model.train()
        self.model.teacher.eval()
        generator = torch.Generator().manual_seed(int(torch.initial_seed()) % 2**31)
        order: list[int] = []
        best_val, best_state, best_step, checks_without_gain = math.inf, None, 0, 0
        history: list[dict[str, float]] = []
        stop_reason, step, train_started = "max_steps", 0, time.perf_counter()
        loss_ema: dict[str, float] = {}
        while step < max_steps:
            if not order:
                order = torch.randperm(len(train), generator=generator).tolist()
            image = train[order.pop()].float().to(self.device)
            loss_st, loss_ae, loss_stae = self.model(
                batch=image, batch_imagenet=penalty.next().to(self.device)
            )
            loss = loss_st + loss_ae + loss_stae
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            for name, value in (("loss", loss), ("st", loss_st), ("ae", loss_ae), ("stae", loss_stae)):
                v = float(value.detach())
                loss_ema[name] = 0.98 * loss_ema[name] + 0.02 * v if name in loss_ema else v
            progress("train", step, max_steps)
            if val and cfg.val_every and step % cfg.val_every == 0:
                current = validation_loss(self.model, val)
                self.model.teacher.eval()
                history.append(
                    {
                        "step": step,
                        "train_loss": round(loss_ema["loss"], 5),
                        "train_st": round(loss_ema["st"], 5),
                        "train_ae": round(loss_ema["ae"], 5),
                        "train_stae": round(loss_ema["stae"], 5),
                        "val_loss": round(current, 5),
                    }
                )
                logger.info("efficientad step %d: train %.4f val %.4f", step, loss_ema["loss"], current)
                if current < best_val * 0.99:
                    best_val, best_step, checks_without_gain = current, step, 0
                    best_state = copy.deepcopy(
                        {"student": self.model.student.state_dict(), "ae": self.model.ae.state_dict()}
                    )
                else:
                    checks_without_gain += 1
                    if cfg.patience and checks_without_gain >= cfg.patience:
                        stop_reason = "early_stopping"
                        break
            if cfg.time_budget_s and time.perf_counter() - train_started > cfg.time_budget_s:
                stop_reason = "time_budget"
                break
        train_seconds = time.perf_counter() - train_started
        if best_state is not None:
            final_val = validation_loss(self.model, val)
            if final_val > best_val:
                self.model.student.load_state_dict(best_state["student"])
                self.model.ae.load_state_dict(best_state["ae"])
            else:
                best_step = step
        self.model.eval()
        self.model.quantiles.update(map_norm_quantiles(self.model, val or [im.float() for im in train[:20]]))
        provenance = self.teacher_info.provenance
        return {
            "teacher": self.teacher_info.source,
            "teacher_path": str(self.teacher_info.path) if self.teacher_info.path else None,
            "teacher_heldout_regression_error": provenance.get("heldout_regression_error"),
            "teacher_seconds": round(teacher_seconds, 1),
            "steps": step,
            "kept_step": best_step if best_state is not None else step,
            "stop_reason": stop_reason,
            "train_seconds": round(train_seconds, 1),
            "seconds_per_step": round(train_seconds / max(step, 1), 3),
            "n_val": n_val,
            "penalty_images": len(penalty),
            "history": history,
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

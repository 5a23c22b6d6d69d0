"""The student + autoencoder training loop of the served model (anomalib's step, batch size 1).

On top of anomalib's loop: a validation loss on held-out training normals every ``val_every`` steps,
early stopping after ``patience`` checks without a 1 % gain (the best weights are kept), and a time
budget. Every value comes from the resolved :class:`~.config.EfficientAdConfig`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any

import torch

from defect_assist.core.models.efficientad.config import EfficientAdConfig
from defect_assist.core.models.efficientad.loss import validation_loss
from defect_assist.core.models.efficientad.penalty import PenaltyImages
from defect_assist.core.models.efficientad.torch_model import (
    OfflineEfficientAdModel,
    map_norm_quantiles,
    teacher_channel_mean_std,
)
from defect_assist.core.progress import ProgressCallback

logger = logging.getLogger(__name__)

LOSS_TERMS = ("loss", "st", "ae", "stae")


class StudentTrainer:
    """Trains ``model``'s student and autoencoder on in-memory images (its teacher stays frozen)."""

    def __init__(
        self,
        model: OfflineEfficientAdModel,
        config: EfficientAdConfig,
        device: torch.device,
        progress: ProgressCallback,
    ) -> None:
        self.model, self.config, self.device, self.progress = model, config, device, progress
        self.step, self.stop_reason, self.train_seconds = 0, "max_steps", 0.0
        self.history: list[dict[str, float]] = []
        self.loss_ema: dict[str, float] = {}
        self.best_val, self.best_step, self.checks_without_gain = math.inf, 0, 0
        self.best_state: dict[str, Any] | None = None

    def setup(self, images: list[torch.Tensor], penalty: PenaltyImages) -> None:
        """Hold out validation images, take the teacher's channel statistics, build the optimiser."""
        cfg = self.config
        n_val = 0 if len(images) < 20 else max(5, min(50, round(len(images) * cfg.val_fraction)))
        self.val = [im.float() for im in images[:n_val]]
        self.train = images[n_val:]
        self.penalty = penalty
        self.model.eval()
        self.model.mean_std.update(teacher_channel_mean_std(self.model, [im.float() for im in self.train]))
        self.optimizer = torch.optim.Adam(
            list(self.model.student.parameters()) + list(self.model.ae.parameters()),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=max(int(0.95 * cfg.max_steps), 1), gamma=0.1
        )
        self.generator = torch.Generator().manual_seed(int(torch.initial_seed()) % 2**31)
        self.order: list[int] = []

    def run(self) -> None:
        """Train until ``max_steps``, early stopping or the time budget; then keep the best weights."""
        cfg = self.config
        self.model.train()
        self.model.teacher.eval()
        started = time.perf_counter()
        while self.step < cfg.max_steps:
            self.train_step()
            if self.val and cfg.val_every and self.step % cfg.val_every == 0 and self.validate():
                self.stop_reason = "early_stopping"
                break
            if cfg.time_budget_s and time.perf_counter() - started > cfg.time_budget_s:
                self.stop_reason = "time_budget"
                break
        self.train_seconds = time.perf_counter() - started
        self.restore_best()
        self.model.eval()
        self.model.quantiles.update(
            map_norm_quantiles(self.model, self.val or [im.float() for im in self.train[:20]])
        )

    def train_step(self) -> None:
        """One image, one penalty image: anomalib's three losses, one Adam step."""
        if not self.order:
            self.order = torch.randperm(len(self.train), generator=self.generator).tolist()
        image = self.train[self.order.pop()].float().to(self.device)
        loss_st, loss_ae, loss_stae = self.model(
            batch=image, batch_imagenet=self.penalty.next().to(self.device)
        )
        loss = loss_st + loss_ae + loss_stae
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        for name, value in zip(LOSS_TERMS, (loss, loss_st, loss_ae, loss_stae), strict=True):
            v = float(value.detach())
            self.loss_ema[name] = 0.98 * self.loss_ema[name] + 0.02 * v if name in self.loss_ema else v
        self.progress("train", self.step, self.config.max_steps)

    def validate(self) -> bool:
        """Validation loss now (recorded, best weights kept); ``True`` when training should stop early."""
        current = validation_loss(self.model, self.val)
        self.model.teacher.eval()
        ema = self.loss_ema
        record = {"step": self.step, "train_loss": round(ema["loss"], 5)}
        record |= {f"train_{k}": round(ema[k], 5) for k in LOSS_TERMS[1:]}
        self.history.append(record | {"val_loss": round(current, 5)})
        logger.info("efficientad step %d: train %.4f val %.4f", self.step, ema["loss"], current)
        if current < self.best_val * 0.99:
            self.best_val, self.best_step, self.checks_without_gain = current, self.step, 0
            self.best_state = copy.deepcopy(
                {"student": self.model.student.state_dict(), "ae": self.model.ae.state_dict()}
            )
            return False
        self.checks_without_gain += 1
        return bool(self.config.patience and self.checks_without_gain >= self.config.patience)

    def restore_best(self) -> None:
        """Go back to the best validated weights unless the final ones are at least as good."""
        if self.best_state is None:
            return
        if validation_loss(self.model, self.val) > self.best_val:
            self.model.student.load_state_dict(self.best_state["student"])
            self.model.ae.load_state_dict(self.best_state["ae"])
        else:
            self.best_step = self.step

    def summary(self) -> dict[str, Any]:
        """What the metadata records about the training."""
        return {
            "steps": self.step,
            "kept_step": self.best_step if self.best_state is not None else self.step,
            "stop_reason": self.stop_reason,
            "train_seconds": round(self.train_seconds, 1),
            "seconds_per_step": round(self.train_seconds / max(self.step, 1), 3),
            "n_val": len(self.val),
            "penalty_images": len(self.penalty),
            "history": self.history,
        }

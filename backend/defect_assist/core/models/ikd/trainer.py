"""The student's training loop of the served IKD model: epochs over in-memory normals.

Adam on the student only, the loss of :class:`~.loss.IkdLoss`; after every epoch the plain
distillation loss (mean of eq. (1) of :mod:`.loss` over the levels) on held-out training normals;
the best weights are kept, training stops after ``patience`` epochs without a 1 % gain, at
``epochs`` or when the time budget is spent. Every value comes from :class:`~.config.IkdConfig`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any

import torch

from defect_assist.core.models.ikd.config import IkdConfig
from defect_assist.core.models.ikd.loss import IkdLoss, discrepancy
from defect_assist.core.models.ikd.torch_model import IkdModel
from defect_assist.core.progress import ProgressCallback

logger = logging.getLogger(__name__)


@torch.no_grad()
def validation_loss(model: IkdModel, images: list[torch.Tensor], batch_size: int) -> float:
    """Mean teacher-student discrepancy (eq. (1), averaged over pixels and levels) on ``images``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        batch = torch.cat(images[start : start + batch_size]).float()
        teacher, student = model.features(batch)
        levels = zip(teacher, student, strict=True)
        total += sum(float(discrepancy(t, s).mean()) for t, s in levels) * len(batch)
        count += len(batch)
    model.train(was_training)
    return total / max(count, 1) / max(len(model.layers), 1)


class StudentTrainer:
    """Trains ``model.student`` on in-memory normalised images (``(1, 3, S, S)`` half tensors)."""

    def __init__(
        self, model: IkdModel, config: IkdConfig, device: torch.device, progress: ProgressCallback
    ) -> None:
        self.model, self.config, self.device, self.progress = model, config, device, progress
        self.loss = IkdLoss(config.csl_weight, config.ahsm_alpha)
        self.epoch, self.steps, self.stop_reason, self.train_seconds = 0, 0, "epochs", 0.0
        self.history: list[dict[str, float]] = []
        self.best_val, self.best_epoch, self.epochs_without_gain = math.inf, 0, 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def setup(self, images: list[torch.Tensor]) -> None:
        """Hold out validation images, build the optimiser and the seeded shuffling."""
        cfg = self.config
        n_val = 0 if len(images) < 20 else max(4, min(48, round(len(images) * cfg.val_fraction)))
        self.val, self.train = images[:n_val], images[n_val:]
        self.optimizer = torch.optim.Adam(
            self.model.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.generator = torch.Generator().manual_seed(int(torch.initial_seed()) % 2**31)

    def run(self) -> None:
        """Epochs until ``epochs``, early stopping or the time budget; then the best weights."""
        cfg, started = self.config, time.perf_counter()
        self.model.train()
        while self.epoch < cfg.epochs:
            train_loss = self.train_epoch()
            self.epoch += 1
            if self.validate(train_loss):
                self.stop_reason = "early_stopping"
                break
            if cfg.time_budget_s and time.perf_counter() - started > cfg.time_budget_s:
                self.stop_reason = "time_budget"
                break
        self.train_seconds = time.perf_counter() - started
        if self.best_state is not None:
            self.model.student.load_state_dict(self.best_state)
        self.model.eval()

    def train_epoch(self) -> float:
        """One pass over the shuffled training images (batches of ``train_batch_size``); mean loss."""
        size, total = self.config.train_batch_size, 0.0
        order = torch.randperm(len(self.train), generator=self.generator).tolist()
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        if len(batches) > 1 and len(batches[-1]) < 2:  # CSL needs two samples; merge a lone image
            batches[-2] += batches.pop()
        for indices in batches:
            batch = torch.cat([self.train[i] for i in indices]).float().to(self.device)
            loss = self.loss(*self.model.features(batch))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.steps += 1
            total += float(loss.detach())
            self.progress("train", self.steps, len(batches) * self.config.epochs)
        return total / max(len(batches), 1)

    def validate(self, train_loss: float) -> bool:
        """Record this epoch, keep the best weights; ``True`` when training should stop early."""
        current = validation_loss(self.model, self.val or self.train[:16], self.config.train_batch_size)
        record = {"epoch": self.epoch, "train_loss": round(train_loss, 5), "val_loss": round(current, 5)}
        self.history.append(record | {k: round(v, 5) for k, v in self.loss.last.items()})
        logger.info("ikd epoch %d: train %.4f val %.4f", self.epoch, train_loss, current)
        gained = current < self.best_val * 0.99
        if current < self.best_val:
            self.best_val, self.best_epoch = current, self.epoch
            self.best_state = copy.deepcopy(self.model.student.state_dict())
        self.epochs_without_gain = 0 if gained else self.epochs_without_gain + 1
        return bool(self.config.patience and self.epochs_without_gain >= self.config.patience)

    def summary(self) -> dict[str, Any]:
        """What the metadata records about the training."""
        return {
            "epochs": self.epoch,
            "steps": self.steps,
            "kept_epoch": self.best_epoch,
            "best_val_loss": round(self.best_val, 5),
            "stop_reason": self.stop_reason,
            "train_seconds": round(self.train_seconds, 1),
            "n_val": len(self.val),
            "history": self.history,
        }

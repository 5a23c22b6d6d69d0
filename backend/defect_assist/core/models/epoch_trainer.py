"""Epochs over in-memory training items with early stopping on a held-out loss (CFA, IKD).

After every epoch the subclass's :meth:`EpochTrainer.held_out_loss` is recorded; the best weights of
:attr:`EpochTrainer.trained` are kept, training stops after ``patience`` epochs without a 1 % gain,
at ``epochs`` or when ``time_budget_s`` is spent, and the best weights are loaded back.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any

import torch

from defect_assist.core.progress import ProgressCallback

logger = logging.getLogger(__name__)


class EpochTrainer:
    """The loop; subclasses give :attr:`trained`, :meth:`train_epoch` and :meth:`held_out_loss`."""

    name = "model"

    def __init__(self, model: Any, config: Any, device: torch.device, progress: ProgressCallback) -> None:
        self.model, self.config, self.device, self.progress = model, config, device, progress
        self.epoch, self.steps, self.stop_reason, self.train_seconds = 0, 0, "epochs", 0.0
        self.history: list[dict[str, float]] = []
        self.best_val, self.best_epoch, self.epochs_without_gain = math.inf, 0, 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.val: list[torch.Tensor] = []
        self.train: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(int(torch.initial_seed()) % 2**31)

    @property
    def trained(self) -> torch.nn.Module:
        """The module whose weights are optimised and kept at their best epoch."""
        raise NotImplementedError

    def train_epoch(self) -> float:
        """One pass over :attr:`train`; the mean training loss."""
        raise NotImplementedError

    def held_out_loss(self) -> float:
        """The early-stopping signal on :attr:`val` (or a few training items when there are none)."""
        raise NotImplementedError

    def epoch_facts(self) -> dict[str, float]:
        """Extra values recorded in this epoch's history entry."""
        return {}

    def split(self, items: list[torch.Tensor]) -> None:
        """Hold out ``val_fraction`` of ``items`` (4 to 48; none below 20 items)."""
        fraction = self.config.val_fraction
        n_val = 0 if len(items) < 20 else max(4, min(48, round(len(items) * fraction)))
        self.val, self.train = items[:n_val], items[n_val:]

    def batches(self) -> list[list[int]]:
        """Shuffled (seeded) index batches of ``train_batch_size`` over :attr:`train`."""
        size = self.config.train_batch_size
        order = torch.randperm(len(self.train), generator=self.generator).tolist()
        return [order[i : i + size] for i in range(0, len(order), size)]

    def step(self, loss: torch.Tensor, n_batches: int) -> float:
        """One optimiser step on ``loss``; reports progress; the loss value."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        self.progress("train", self.steps, n_batches * self.config.epochs)
        return float(loss.detach())

    def run(self) -> None:
        """Epochs until ``epochs``, early stopping or the time budget; then the best weights."""
        cfg, started = self.config, time.perf_counter()
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
            self.trained.load_state_dict(self.best_state)
        self.model.eval()

    def validate(self, train_loss: float) -> bool:
        """Record this epoch, keep the best weights; ``True`` when training should stop early."""
        current = self.held_out_loss()
        record = {"epoch": self.epoch, "train_loss": round(train_loss, 5), "val_loss": round(current, 5)}
        self.history.append(record | {k: round(v, 5) for k, v in self.epoch_facts().items()})
        logger.info("%s epoch %d: train %.4f val %.4f", self.name, self.epoch, train_loss, current)
        gained = current < self.best_val * 0.99
        if current < self.best_val:
            self.best_val, self.best_epoch = current, self.epoch
            self.best_state = copy.deepcopy(self.trained.state_dict())
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

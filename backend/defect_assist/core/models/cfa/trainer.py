"""The descriptor's training loop of the served CFA model, on cached backbone features.

The backbone is frozen and the inputs are not augmented, so its pooled features
(:meth:`~.torch_model.OfflineCfaModel.patch_features`) are computed once per image and kept in memory
(half precision); an epoch then costs only the 1x1 CoordConv and the distances to the memory bank.
The memory bank is initialised from the training features (anomalib's ``on_train_start``), then
AdamW (anomalib's: lr 1e-3, weight decay 5e-4, amsgrad) minimises anomalib's ``CfaLoss``, each step on
all or a random ``position_fraction`` of the grid positions (the distances to the memory bank are the cost
of a step: ``h·w`` by ``h·w`` per image). After
every epoch the loss of held-out training normals is the early-stopping signal: the best descriptor
is kept, training stops after ``patience`` epochs without a 1 % gain (anomalib's README: patience 5),
at ``epochs`` or when the time budget is spent.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any

import torch

from defect_assist.core.models.cfa.config import CfaConfig
from defect_assist.core.models.cfa.loss import CfaLoss, validation_loss
from defect_assist.core.models.cfa.torch_model import OfflineCfaModel
from defect_assist.core.progress import ProgressCallback

logger = logging.getLogger(__name__)


class DescriptorTrainer:
    """Fits ``model``'s memory bank and descriptor on cached ``(1, D, h, w)`` half feature tensors."""

    def __init__(
        self, model: OfflineCfaModel, config: CfaConfig, device: torch.device, progress: ProgressCallback
    ) -> None:
        self.model, self.config, self.device, self.progress = model, config, device, progress
        self.loss = CfaLoss(config.num_nearest_neighbors, config.num_hard_negative_features, config.radius)
        # anomalib's radius is ``ones(1, requires_grad=True) * r``: a graph node shared by every step,
        # hence its ``backward(retain_graph=True)``. It is never optimised; a constant avoids that.
        self.loss.radius = self.loss.radius.detach()
        self.epoch, self.steps, self.stop_reason, self.train_seconds = 0, 0, "epochs", 0.0
        self.history: list[dict[str, float]] = []
        self.best_val, self.best_epoch, self.epochs_without_gain = math.inf, 0, 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def setup(self, features: list[torch.Tensor]) -> None:
        """Hold out validation features, initialise the memory bank, build the optimiser."""
        cfg = self.config
        n_val = 0 if len(features) < 20 else max(4, min(48, round(len(features) * cfg.val_fraction)))
        self.val, self.train = features[:n_val], features[n_val:]
        size = cfg.train_batch_size
        self.model.initialize_centroid_from_features(
            torch.cat(self.train[i : i + size]).to(self.device) for i in range(0, len(self.train), size)
        )
        self.optimizer = torch.optim.AdamW(
            self.model.descriptor.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=True
        )
        self.generator = torch.Generator().manual_seed(int(torch.initial_seed()) % 2**31)

    def run(self) -> None:
        """Epochs until ``epochs``, early stopping or the time budget; then the best descriptor."""
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
            self.model.descriptor.load_state_dict(self.best_state)
        self.model.eval()

    def train_epoch(self) -> float:
        """One pass over the shuffled cached features (anomalib's training step per batch); mean loss."""
        size, total = self.config.train_batch_size, 0.0
        order = torch.randperm(len(self.train), generator=self.generator).tolist()
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        self.model.train()
        for indices in batches:
            features = torch.cat([self.train[i] for i in indices]).float().to(self.device)
            loss = self.loss(self.model.compute_distance(self.sampled(self.model.descriptor.layer(features))))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.steps += 1
            total += float(loss.detach())
            self.progress("train", self.steps, len(batches) * self.config.epochs)
        self.model.eval()
        return total / max(len(batches), 1)

    def sampled(self, target: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` target features -> ``(B, n, C)`` at ``position_fraction`` of the positions.

        The CoordConv ran on the full grid (its coordinates are the true ones); only the distances to
        the memory bank and the loss, the cost of a step, are limited to the sampled positions. The
        loss is a mean over positions, so the sample estimates it without bias.
        """
        flat = target.flatten(2).transpose(1, 2)
        fraction = self.config.position_fraction
        if fraction >= 1:
            return flat
        n = max(1, round(fraction * flat.shape[1]))
        positions = torch.randperm(flat.shape[1], generator=self.generator)[:n].to(flat.device)
        return flat[:, positions]

    def validate(self, train_loss: float) -> bool:
        """Record this epoch, keep the best descriptor; ``True`` when training should stop early."""
        held_out = self.val or self.train[:16]
        current = validation_loss(self.model, self.loss, held_out, self.config.train_batch_size)
        self.history.append(
            {"epoch": self.epoch, "train_loss": round(train_loss, 5), "val_loss": round(current, 5)}
        )
        logger.info("cfa epoch %d: train %.4f val %.4f", self.epoch, train_loss, current)
        gained = current < self.best_val * 0.99
        if current < self.best_val:
            self.best_val, self.best_epoch = current, self.epoch
            self.best_state = copy.deepcopy(self.model.descriptor.state_dict())
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

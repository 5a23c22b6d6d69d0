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

import torch

from defect_assist.core.models.cfa.config import CfaConfig
from defect_assist.core.models.cfa.loss import CfaLoss, validation_loss
from defect_assist.core.models.cfa.torch_model import OfflineCfaModel
from defect_assist.core.models.epoch_trainer import EpochTrainer
from defect_assist.core.progress import ProgressCallback


class DescriptorTrainer(EpochTrainer):
    """Fits ``model``'s memory bank and descriptor on cached ``(1, D, h, w)`` half feature tensors."""

    name = "cfa"

    def __init__(
        self, model: OfflineCfaModel, config: CfaConfig, device: torch.device, progress: ProgressCallback
    ) -> None:
        super().__init__(model, config, device, progress)
        self.loss = CfaLoss(config.num_nearest_neighbors, config.num_hard_negative_features, config.radius)
        # anomalib's radius is ``ones(1, requires_grad=True) * r``: a graph node shared by every step,
        # hence its ``backward(retain_graph=True)``. It is never optimised; a constant avoids that.
        self.loss.radius = self.loss.radius.detach()

    @property
    def trained(self) -> torch.nn.Module:
        return self.model.descriptor

    def setup(self, features: list[torch.Tensor]) -> None:
        """Hold out validation features, initialise the memory bank, build the optimiser."""
        cfg = self.config
        self.split(features)
        size = cfg.train_batch_size
        self.model.initialize_centroid_from_features(
            torch.cat(self.train[i : i + size]).to(self.device) for i in range(0, len(self.train), size)
        )
        self.optimizer = torch.optim.AdamW(
            self.model.descriptor.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=True
        )

    def train_epoch(self) -> float:
        """One pass over the shuffled cached features (anomalib's training step per batch); mean loss."""
        batches, total = self.batches(), 0.0
        self.model.train()
        for indices in batches:
            features = torch.cat([self.train[i] for i in indices]).float().to(self.device)
            loss = self.loss(self.model.compute_distance(self.sampled(self.model.descriptor.layer(features))))
            total += self.step(loss, len(batches))
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

    def held_out_loss(self) -> float:
        held_out = self.val or self.train[:16]
        return validation_loss(self.model, self.loss, held_out, self.config.train_batch_size)

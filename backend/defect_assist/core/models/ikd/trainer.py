"""The student's training loop of the served IKD model: epochs over in-memory normals.

Adam on the student only, the loss of :class:`~.loss.IkdLoss`; after every epoch the plain
distillation loss (mean of eq. (1) of :mod:`.loss` over the levels) on held-out training normals;
the best weights are kept, training stops after ``patience`` epochs without a 1 % gain, at
``epochs`` or when the time budget is spent. Every value comes from :class:`~.config.IkdConfig`.
"""

from __future__ import annotations

import torch

from defect_assist.core.models.epoch_trainer import EpochTrainer
from defect_assist.core.models.ikd.config import IkdConfig
from defect_assist.core.models.ikd.loss import IkdLoss, discrepancy
from defect_assist.core.models.ikd.torch_model import IkdModel
from defect_assist.core.progress import ProgressCallback


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


class StudentTrainer(EpochTrainer):
    """Trains ``model.student`` on in-memory normalised images (``(1, 3, S, S)`` half tensors)."""

    name = "ikd"

    def __init__(
        self, model: IkdModel, config: IkdConfig, device: torch.device, progress: ProgressCallback
    ) -> None:
        super().__init__(model, config, device, progress)
        self.loss = IkdLoss(config.csl_weight, config.ahsm_alpha)

    @property
    def trained(self) -> torch.nn.Module:
        return self.model.student

    def setup(self, images: list[torch.Tensor]) -> None:
        """Hold out validation images, build the optimiser."""
        self.split(images)
        cfg = self.config
        self.optimizer = torch.optim.Adam(
            self.model.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )

    def train_epoch(self) -> float:
        """One pass over the shuffled training images (batches of ``train_batch_size``); mean loss."""
        batches, total = self.batches(), 0.0
        if len(batches) > 1 and len(batches[-1]) < 2:  # CSL needs two samples; merge a lone image
            batches[-2] += batches.pop()
        self.model.train()
        for indices in batches:
            batch = torch.cat([self.train[i] for i in indices]).float().to(self.device)
            total += self.step(self.loss(*self.model.features(batch)), len(batches))
        return total / max(len(batches), 1)

    def held_out_loss(self) -> float:
        return validation_loss(self.model, self.val or self.train[:16], self.config.train_batch_size)

    def epoch_facts(self) -> dict[str, float]:
        return dict(self.loss.last)

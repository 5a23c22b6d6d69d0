"""The early-stopping signal of our training loop (anomalib's training losses live in its network)."""

from __future__ import annotations

import torch
from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel


@torch.no_grad()
def validation_loss(model: EfficientAdModel, images: list[torch.Tensor]) -> float:
    """Mean ST + AE-teacher + ST-AE squared distances on held-out normals (no hard mining, no penalty)."""
    was_training = model.training
    model.eval()
    c = model.teacher_out_channels
    total = 0.0
    for image in images:
        teacher = model._normalize_teacher(model.teacher(image))
        student = model.student(image)
        ae = model.ae(image, image.shape[-2:])
        total += float(
            ((teacher - student[:, :c]) ** 2).mean()
            + ((teacher - ae) ** 2).mean()
            + ((ae - student[:, c:]) ** 2).mean()
        )
    model.train(was_training)
    return total / max(len(images), 1)

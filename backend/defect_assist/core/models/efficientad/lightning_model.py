"""anomalib's EfficientAd Lightning module, made to train offline (for ``anomalib.engine.Engine`` users).

``OfflineEfficientAd`` is anomalib 2.7's :class:`~anomalib.models.EfficientAd` with two changes:
the teacher is loaded from a given file (official, distilled, or the one :func:`resolve_teacher`
finds or distils) instead of being downloaded, and the penalty images must already exist in
``imagenet_dir`` (an ``ImageFolder``, e.g. ``imagenet_sample``) instead of imagenette being
downloaded. Use with ``train_batch_size=1``.

Alternatively, ``defect-assist distill-teacher --install-anomalib`` puts the distilled teacher
where stock anomalib reads it, and passing ``imagenet_dir`` to stock ``EfficientAd`` avoids the
imagenette download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from anomalib.models import EfficientAd
from torch.utils.data import DataLoader

from defect_assist.core.models.efficientad.teacher import TeacherInfo, load_teacher_weights, resolve_teacher


class OfflineEfficientAd(EfficientAd):
    """anomalib's EfficientAd that never downloads (teacher file + local penalty images)."""

    def __init__(self, imagenet_dir: Path | str, teacher: str | Path = "auto", **kwargs: Any) -> None:
        super().__init__(imagenet_dir=imagenet_dir, **kwargs)
        self.teacher_spec = str(teacher)
        self.teacher_info: TeacherInfo | None = None

    def prepare_pretrained_model(self) -> None:
        """Load the teacher from the official file, a distilled one, a path, or keep it random."""
        self.teacher_info = resolve_teacher(self.model_size.value, self.teacher_spec)
        load_teacher_weights(self.model.teacher, self.teacher_info)
        self.model.teacher.to(self.device)

    def prepare_imagenette_data(self, image_size: tuple[int, int] | torch.Size) -> None:
        """Penalty images from the local folder; a missing folder is an error, never a download."""
        if not self.imagenet_dir.is_dir():
            raise FileNotFoundError(
                f"penalty images folder {self.imagenet_dir} not found (no download offline)"
            )
        super().prepare_imagenette_data(image_size)
        self.imagenet_loader = DataLoader(
            self.imagenet_loader.dataset, batch_size=1, shuffle=True, pin_memory=False
        )
        self.imagenet_iterator = iter(self.imagenet_loader)

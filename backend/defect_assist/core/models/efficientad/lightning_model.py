"""anomalib's EfficientAd Lightning module with the served model's defaults and network, never downloading.

``OfflineEfficientAd`` is anomalib 2.7's :class:`~anomalib.models.EfficientAd` for
``anomalib.engine.Engine`` users, with the defaults of the served model on CPU
(:class:`~.config.EfficientAdConfig` resolved with ``cuda=False``: small PDNs, 128 px squashed,
lr 2e-4, replicated map border) and its network (:func:`~.torch_model.build_model`: the
autoencoder accepts < 256 px, ``map_border``). Two downloads are replaced: the teacher is the one
the served model would use (:func:`~.teacher.resolve.configured_teacher`: anomalib's official file,
else our cached distilled one, distilled when missing; or ``random`` / a file), and the penalty
images must already exist in ``imagenet_dir`` (an ``ImageFolder``; default
``<DATASETS_DIR>/imagenet_sample``). Use with ``train_batch_size=1``; the number of steps is the
``Engine``'s (``max_steps``), not the schedule's::

    engine = Engine(default_root_dir="results", max_steps=1500)
    engine.fit(OfflineEfficientAd(), datamodule=Folder(..., train_batch_size=1))

What the ``Engine`` does not have of the served model: the early stopping and time budget of its
training loop, letterbox resizing and its calibration (anomalib's post-processor normalises instead).
Alternatively, ``defect-assist distill-teacher --install-anomalib`` puts the distilled teacher where
stock anomalib reads it, and passing ``imagenet_dir`` to stock ``EfficientAd`` avoids the imagenette
download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from anomalib.models import EfficientAd
from anomalib.pre_processing import PreProcessor
from torch.utils.data import DataLoader

from defect_assist.core.models.efficientad.config import EfficientAdConfig
from defect_assist.core.models.efficientad.teacher.paths import TeacherInfo, natural_images_dir
from defect_assist.core.models.efficientad.teacher.resolve import configured_teacher, load_teacher_weights
from defect_assist.core.models.efficientad.torch_model import build_model

DEFAULTS = EfficientAdConfig().resolved(cuda=False)


class OfflineEfficientAd(EfficientAd):
    """anomalib's EfficientAd with the served model's defaults that never downloads."""

    def __init__(
        self,
        imagenet_dir: Path | str | None = None,
        teacher: str = DEFAULTS.teacher,
        model_size: str = DEFAULTS.model_size,
        image_size: int = DEFAULTS.image_size,  # type: ignore[assignment]  # resolved: an int
        lr: float = DEFAULTS.lr,  # type: ignore[assignment]
        weight_decay: float = DEFAULTS.weight_decay,
        padding: bool = DEFAULTS.padding,
        pad_maps: bool = DEFAULTS.pad_maps,
        map_border: str = DEFAULTS.map_border,
        teacher_data: str | None = DEFAULTS.teacher_data,
        model_dir: str | None = DEFAULTS.model_dir,
        backbone: str = DEFAULTS.backbone,
        pre_processor: PreProcessor | bool = True,
        **kwargs: Any,
    ) -> None:
        penalty_dir = str(imagenet_dir) if imagenet_dir is not None else DEFAULTS.penalty_dir
        config = EfficientAdConfig(
            backbone=backbone,
            model_size=model_size,
            teacher=teacher,
            teacher_data=teacher_data,
            penalty_dir=penalty_dir,
            model_dir=model_dir,
            image_size=image_size,
            lr=lr,
            weight_decay=weight_decay,
            padding=padding,
            pad_maps=pad_maps,
            map_border=map_border,
            resize="squash",  # anomalib's pre-processor squashes
        ).resolved(cuda=False)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor((image_size, image_size))
        super().__init__(
            imagenet_dir=penalty_dir or natural_images_dir(),
            model_size=model_size,
            lr=lr,
            weight_decay=weight_decay,
            padding=padding,
            pad_maps=pad_maps,
            pre_processor=pre_processor,
            **kwargs,
        )
        self.efficientad_config = config
        self.model = build_model(model_size, None, padding, pad_maps, map_border)  # the served network
        self.teacher_info: TeacherInfo | None = None

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """anomalib's (a squashing resize, no normalisation) at the served model's size by default."""
        return super().configure_pre_processor(image_size or (DEFAULTS.image_size, DEFAULTS.image_size))

    def prepare_pretrained_model(self) -> None:
        """The served model's teacher: official file, cached/distilled, random or a given file."""
        self.teacher_info = configured_teacher(self.efficientad_config)
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

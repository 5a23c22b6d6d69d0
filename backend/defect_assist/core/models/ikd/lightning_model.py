"""Lightning/anomalib wrapper: the served IKD inside anomalib's ``Engine``.

``Ikd`` is an :class:`~anomalib.models.components.AnomalibModule` (laid out like anomalib's STFPM
module, which IKD extends) around :class:`~.torch_model.IkdModel` built from the served model's
:class:`~.config.IkdConfig` defaults (Lite0 teacher and student, ``blocks.1/2/4``, 160 px, CSL
weight 1, AHSM α 0, Adam 1e-3, map σ 8 per 256 px). Its training step is IKD's loss, its validation
step anomalib's predictions; post-processing, metrics and visualisation are anomalib's::

    from anomalib.engine import Engine
    engine = Engine(default_root_dir="results", max_epochs=30)
    engine.fit(Ikd(), datamodule=Folder(..., train_batch_size=16))

What differs from the served model (``IkdAnomalyModel``): anomalib's pre-processor squashes every
image to ``image_size`` (the served model letterboxes by default), the number of epochs and any
early stopping are the ``Engine``'s (callbacks), and anomalib's post-processor normalises scores with
thresholds from the validation set instead of the served calibration on held-out normals. Use a
training batch size of at least 2 (CSL compares the samples of a batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torchvision.transforms.v2 import Compose, Normalize, Resize

from defect_assist.core import backbones
from defect_assist.core.models.ikd.config import IkdConfig
from defect_assist.core.models.ikd.loss import IkdLoss
from defect_assist.core.models.ikd.torch_model import DEFAULTS, IkdModel


class Ikd(AnomalibModule):
    """IKD (Cao et al., KBS 2022) as an anomalib Lightning module, with the served model's defaults."""

    def __init__(
        self,
        backbone: str = DEFAULTS.backbone,
        layers: Sequence[str] = tuple(DEFAULTS.layers),
        pre_trained: bool = DEFAULTS.pretrained,
        image_size: int = DEFAULTS.image_size,
        csl_weight: float = DEFAULTS.csl_weight,
        ahsm_alpha: float = DEFAULTS.ahsm_alpha,
        lr: float = DEFAULTS.lr,
        weight_decay: float = DEFAULTS.weight_decay,
        map_combine: str = DEFAULTS.map_combine,
        anomaly_map_sigma: float = DEFAULTS.anomaly_map_sigma,
        pre_processor: PreProcessor | bool = True,
        **kwargs: Any,
    ) -> None:
        self.ikd_config = IkdConfig(
            backbone=backbone,
            layers=list(layers),
            pretrained=pre_trained,
            image_size=image_size,
            resize="squash",  # anomalib's pre-processor
            csl_weight=csl_weight,
            ahsm_alpha=ahsm_alpha,
            lr=lr,
            weight_decay=weight_decay,
            map_combine=map_combine,
            anomaly_map_sigma=anomaly_map_sigma,
        )
        if pre_processor is True:
            pre_processor = self.configure_pre_processor((image_size, image_size), backbone)
        super().__init__(pre_processor=pre_processor, **kwargs)
        self.model = IkdModel.from_config(self.ikd_config)
        self.loss = IkdLoss(csl_weight, ahsm_alpha)

    @classmethod
    def configure_pre_processor(
        cls, image_size: tuple[int, int] | None = None, backbone: str = DEFAULTS.backbone
    ) -> PreProcessor:
        """Resize to ``image_size`` (default the served 160 px) and the backbone's own normalisation."""
        size = image_size or (DEFAULTS.image_size, DEFAULTS.image_size)
        mean, std = backbones.normalisation(backbone)
        return PreProcessor(transform=Compose([Resize(size, antialias=True), Normalize(mean=mean, std=std)]))

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """IKD's loss (AHSM + λ CSL over the levels) of the student against the frozen teacher."""
        del args, kwargs
        teacher, student = self.model(batch.image)
        loss = self.loss(teacher, student)
        self.log("train_loss", loss.item(), on_epoch=True, prog_bar=True, logger=True)
        return {"loss": loss}

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """anomalib's validation: predictions (scores and maps) for the post-processor and metrics."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam on the student only (the teacher is frozen)."""
        cfg = self.ikd_config
        return torch.optim.Adam(self.model.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        return {"gradient_clip_val": 0, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS

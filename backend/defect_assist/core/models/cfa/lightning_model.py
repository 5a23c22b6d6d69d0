"""Lightning/anomalib wrapper: anomalib's ``Cfa`` module on the offline backbone, for ``Engine``.

``OfflineCfa`` is anomalib 2.7's :class:`~anomalib.models.image.cfa.lightning_model.Cfa` (its
``on_train_start`` memory-bank initialisation, training and validation steps, AdamW settings,
trainer arguments, post-processing and metrics) with the torch model swapped for
:class:`~.torch_model.OfflineCfaModel` built from the served model's :class:`~.config.CfaConfig`
defaults (Lite0, ``blocks.1/2/4``, 192 px, K = J = 3, r = 1e-5), and a pre-processor with the
backbone's own normalisation. anomalib's ``Cfa.__init__`` would build torchvision's backbone with
downloaded weights, so it is skipped (``AnomalibModule.__init__`` is called directly)::

    from anomalib.engine import Engine
    from lightning.pytorch.callbacks import EarlyStopping
    engine = Engine(max_epochs=30, callbacks=[EarlyStopping("pixel_AUROC", patience=5, mode="max")])
    engine.fit(OfflineCfa(), datamodule=Folder(...))

What differs from the served model (``CfaAnomalyModel``): anomalib runs the frozen backbone at every
step (the served trainer caches its features), its pre-processor squashes images (the served model
letterboxes by default), early stopping is the ``Engine``'s callbacks, and anomalib's post-processor
normalises scores with validation-set thresholds instead of the served calibration.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from anomalib.models.components import AnomalibModule
from anomalib.models.image.cfa.lightning_model import Cfa
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, Normalize, Resize

from defect_assist.core import backbones
from defect_assist.core.models.cfa.config import CfaConfig
from defect_assist.core.models.cfa.loss import CfaLoss
from defect_assist.core.models.cfa.torch_model import DEFAULTS, OfflineCfaModel


class OfflineCfa(Cfa):
    """anomalib ``Cfa`` with :class:`OfflineCfaModel` (served-model defaults); nothing downloads."""

    def __init__(
        self,
        backbone: str = DEFAULTS.backbone,
        layers: Sequence[str] = tuple(DEFAULTS.layers),
        pre_trained: bool = DEFAULTS.pretrained,
        image_size: int = DEFAULTS.image_size,
        gamma_c: int = DEFAULTS.gamma_c,
        gamma_d: int = DEFAULTS.gamma_d,
        num_nearest_neighbors: int = DEFAULTS.num_nearest_neighbors,
        num_hard_negative_features: int = DEFAULTS.num_hard_negative_features,
        radius: float = DEFAULTS.radius,
        anomaly_map_sigma: float = DEFAULTS.anomaly_map_sigma,
        pre_processor: PreProcessor | bool = True,
        **kwargs: Any,
    ) -> None:
        config = CfaConfig(
            backbone=backbone,
            layers=list(layers),
            pretrained=pre_trained,
            image_size=image_size,
            resize="squash",  # anomalib's pre-processor
            gamma_c=gamma_c,
            gamma_d=gamma_d,
            num_nearest_neighbors=num_nearest_neighbors,
            num_hard_negative_features=num_hard_negative_features,
            radius=radius,
            anomaly_map_sigma=anomaly_map_sigma,
        )
        if pre_processor is True:
            mean, std = backbones.normalisation(backbone)
            pre_processor = PreProcessor(
                transform=Compose(
                    [Resize((image_size, image_size), antialias=True), Normalize(mean=mean, std=std)]
                )
            )
        AnomalibModule.__init__(self, pre_processor=pre_processor, **kwargs)
        self.cfa_config = config
        self.model = OfflineCfaModel.from_config(config)
        self.loss = CfaLoss(num_nearest_neighbors, num_hard_negative_features, radius)

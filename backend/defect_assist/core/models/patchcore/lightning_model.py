"""Lightning/anomalib wrapper: use the fast PatchCore inside anomalib's ``Engine``.

``FastPatchcore`` is anomalib's ``Patchcore`` Lightning module with its torch model swapped for
:class:`FastPatchcoreModel` (offline EfficientNet-Lite weights, coverage coreset, faiss search) and a
pre-processor using the backbone's own normalisation. Everything else (training/validation steps,
post-processing, metrics, visualisation) is anomalib's::

    from anomalib.engine import Engine
    engine = Engine(max_epochs=1)
    engine.fit(FastPatchcore(), datamodule=Folder(...))
"""

from __future__ import annotations

from collections.abc import Sequence

from anomalib.models.image.patchcore.lightning_model import Patchcore
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, Normalize, Resize

from defect_assist.core import backbones
from defect_assist.core.models.patchcore.torch_model import FastPatchcoreModel


class FastPatchcore(Patchcore):
    """anomalib ``Patchcore`` with the project's :class:`FastPatchcoreModel`."""

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[str] = ("blocks.2", "blocks.4"),
        pre_trained: bool = True,
        coverage_quantile: float = 0.9,
        balance_layers: bool = True,
        num_neighbors: int = 9,
        image_size: int = 256,
        pre_processor: PreProcessor | bool = True,
        **kwargs: object,
    ) -> None:
        if pre_processor is True:
            mean, std = backbones.normalisation(backbone)
            pre_processor = PreProcessor(
                transform=Compose(
                    [Resize((image_size, image_size), antialias=True), Normalize(mean=mean, std=std)]
                )
            )
        # the parent builds anomalib's PatchcoreModel without weights (nothing is downloaded) ...
        super().__init__(
            backbone=backbones.get_spec(backbone).timm_name,
            layers=layers,
            pre_trained=False,
            num_neighbors=num_neighbors,
            pre_processor=pre_processor,
            **kwargs,
        )
        # ... and it is replaced by the fast model carrying the offline ImageNet weights.
        self.model = FastPatchcoreModel(
            backbone=backbone,
            layers=layers,
            pretrained=pre_trained,
            num_neighbors=num_neighbors,
            coverage_quantile=coverage_quantile,
            balance_layers=balance_layers,
        )

"""Lightning/anomalib wrapper: the served PatchCore inside anomalib's ``Engine``.

``FastPatchcore`` is anomalib's ``Patchcore`` Lightning module with its torch model swapped for
:class:`~.torch_model.FastPatchcoreModel` built from the same :class:`~.config.PatchcoreConfig` as the
served model (same defaults: Lite1, ``blocks.2`` + ``blocks.4`` balanced, 256 px, coverage quantile
0.9, 9 neighbours, map σ 24 per 256 px scaled to ``image_size``, bank cap) and a pre-processor using
the backbone's own normalisation. Everything else (training/validation steps, post-processing,
metrics, visualisation) is anomalib's::

    from anomalib.engine import Engine
    engine = Engine(default_root_dir="results")
    engine.fit(FastPatchcore(), datamodule=Folder(...))

What differs from the served model (``PatchcoreAnomalyModel``):

* **Resizing:** anomalib's pre-processor resizes every image to ``image_size`` x ``image_size``
  (torchvision bilinear with antialiasing; aspect ratio not kept), i.e. the served model's
  ``resize="squash"`` rather than its default letterbox, so there is no padding and the map is the
  plain blur (the served model divides by the blur of an all-ones mask, equal up to rounding). The
  served model resizes with PIL's bilinear filter, so pixel values differ slightly.
* **Scores:** anomalib's post-processor normalises scores and maps with thresholds taken from the
  validation set (adaptive F1); the served model calibrates on held-out normals only and then adds
  them to the bank. ``coreset_sampling_ratio`` is accepted and ignored (the bank size follows from
  the coverage radius).
"""

from __future__ import annotations

from collections.abc import Sequence

from anomalib.models.image.patchcore.lightning_model import Patchcore
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, Normalize, Resize

from defect_assist.core import backbones
from defect_assist.core.models.patchcore.config import PatchcoreConfig
from defect_assist.core.models.patchcore.torch_model import DEFAULTS, FastPatchcoreModel


class FastPatchcore(Patchcore):
    """anomalib ``Patchcore`` with the project's :class:`FastPatchcoreModel` (served-model defaults)."""

    def __init__(
        self,
        backbone: str = DEFAULTS.backbone,
        layers: Sequence[str] = tuple(DEFAULTS.layers),
        pre_trained: bool = DEFAULTS.pretrained,
        coverage_quantile: float = DEFAULTS.coverage_quantile,
        balance_layers: bool = DEFAULTS.balance_layers,
        num_neighbors: int = DEFAULTS.num_neighbors,
        image_size: int = DEFAULTS.image_size,
        anomaly_map_sigma: float = DEFAULTS.anomaly_map_sigma,
        max_bank: int = DEFAULTS.max_bank,
        pre_processor: PreProcessor | bool = True,
        **kwargs: object,
    ) -> None:
        config = PatchcoreConfig(
            backbone=backbone,
            layers=list(layers),
            balance_layers=balance_layers,
            image_size=image_size,
            resize="squash",
            coverage_quantile=coverage_quantile,
            num_neighbors=num_neighbors,
            anomaly_map_sigma=anomaly_map_sigma,
            max_bank=max_bank,
            pretrained=pre_trained,
        )
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
        self.model = FastPatchcoreModel.from_config(config)

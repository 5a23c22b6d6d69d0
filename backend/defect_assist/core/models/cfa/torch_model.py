"""CFA torch model (no Lightning): anomalib 2.7's ``CfaModel`` with an offline EfficientNet-Lite.

anomalib's ``CfaModel`` builds its backbone by name from torchvision (ResNet / VGG / WRN, weights
downloaded) and sizes its descriptor from a table of those backbones. Here the backbone is anomalib's
``TimmFeatureExtractor`` on ``tf_efficientnet_lite*`` (truncated after the deepest used block), its
weights copied from the offline package (:func:`defect_assist.core.backbones.load_into`, as
PatchCore does), and the descriptor's CoordConv is sized from the extractor's channels. The
descriptor's pooling, the memory bank (mean target feature per position, optional k-means), the
distances, ``forward`` and the loss are anomalib's. Additions: :meth:`patch_features` (the frozen
backbone part, cached by the served trainer), :meth:`initialize_centroid_from_features`, and
:meth:`score` with letterbox-aware maps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from anomalib.models.components import TimmFeatureExtractor
from anomalib.models.components.cluster.kmeans import KMeans
from anomalib.models.image.cfa.torch_model import CfaModel, CoordConv2d, Descriptor
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from defect_assist.core import backbones
from defect_assist.core.models.cfa.anomaly_map import AnomalyMapGenerator
from defect_assist.core.models.cfa.config import CfaConfig

DEFAULTS = CfaConfig()


class LiteDescriptor(Descriptor):
    """anomalib's descriptor (3x3 average pooling, concatenation, 1x1 CoordConv) for any channel count."""

    def __init__(self, gamma_d: int, dim: int, backbone: str) -> None:
        nn.Module.__init__(self)  # anomalib's __init__ only knows its four backbones' widths
        self.backbone = backbone
        self.layer = CoordConv2d(in_channels=dim, out_channels=dim // gamma_d, kernel_size=1)

    def patch_features(self, features: list[torch.Tensor] | dict[str, torch.Tensor]) -> torch.Tensor:
        """anomalib's pooling and concatenation at the first level's resolution (before the CoordConv)."""
        if isinstance(features, dict):
            features = list(features.values())
        pooled = [F.avg_pool2d(feature, 3, 1, 1) for feature in features]
        size = pooled[0].shape[-2:]
        return torch.cat([pooled[0]] + [F.interpolate(p, size, mode="bilinear") for p in pooled[1:]], dim=1)

    def forward(self, features: list[torch.Tensor] | dict[str, torch.Tensor]) -> torch.Tensor:
        return self.layer(self.patch_features(features))


def _truncated(extractor: TimmFeatureExtractor) -> TimmFeatureExtractor:
    """Drop the blocks after the deepest extracted one (timm runs every block; they feed nothing)."""
    network = extractor.feature_extractor
    blocks, stages = getattr(network, "blocks", None), getattr(network, "_stage_out_idx", None)
    if isinstance(blocks, nn.Sequential) and stages and 0 not in stages:
        network.blocks = blocks[: max(stages)]
    return extractor


class OfflineCfaModel(CfaModel):
    """anomalib's ``CfaModel`` on an offline EfficientNet-Lite backbone (nothing downloads)."""

    def __init__(
        self,
        backbone: str = DEFAULTS.backbone,
        layers: Sequence[str] = tuple(DEFAULTS.layers),
        pretrained: bool = DEFAULTS.pretrained,
        gamma_c: int = DEFAULTS.gamma_c,
        gamma_d: int = DEFAULTS.gamma_d,
        num_nearest_neighbors: int = DEFAULTS.num_nearest_neighbors,
        num_hard_negative_features: int = DEFAULTS.num_hard_negative_features,
        radius: float = DEFAULTS.radius,
        anomaly_map_sigma: float = 4.0,
    ) -> None:
        super(CfaModel, self).__init__()  # anomalib's __init__ would fetch torchvision weights
        spec = backbones.get_spec(backbone)
        self.gamma_c, self.gamma_d = gamma_c, gamma_d
        self.num_nearest_neighbors = num_nearest_neighbors
        self.num_hard_negative_features = num_hard_negative_features
        self.register_buffer("memory_bank", torch.tensor(0.0))
        self.memory_bank: torch.Tensor
        self.backbone = spec.timm_name
        self.layers = list(layers)
        self.feature_extractor = _truncated(
            TimmFeatureExtractor(spec.timm_name, self.layers, pre_trained=False)
        )
        if pretrained:
            backbones.load_into(self.feature_extractor.feature_extractor, backbone)
        self.feature_extractor.eval().requires_grad_(False)
        self.descriptor = LiteDescriptor(gamma_d, sum(self.feature_extractor.out_dims), spec.timm_name)
        self.radius = torch.ones(1, requires_grad=True) * radius
        self.anomaly_map_generator = AnomalyMapGenerator(num_nearest_neighbors, sigma=anomaly_map_sigma)

    @classmethod
    def from_config(cls, config: CfaConfig) -> OfflineCfaModel:
        """The model a :class:`CfaConfig` describes (σ scaled from 256 px to ``image_size``)."""
        return cls(
            backbone=config.backbone,
            layers=config.layers,
            pretrained=config.pretrained,
            gamma_c=config.gamma_c,
            gamma_d=config.gamma_d,
            num_nearest_neighbors=config.num_nearest_neighbors,
            num_hard_negative_features=config.num_hard_negative_features,
            radius=config.radius,
            anomaly_map_sigma=config.map_sigma_pixels,
        )

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen part: backbone features pooled and concatenated, ``(B, D, h, w)``."""
        self.feature_extractor.eval()
        return self.descriptor.patch_features(self.feature_extractor(images))

    def get_scale(self, input_size: tuple[int, int] | torch.Size) -> torch.Size:
        """The first (largest) feature grid for ``input_size`` (anomalib's dry run needs its node names)."""
        with torch.no_grad():
            device = next(self.feature_extractor.parameters()).device
            first = next(iter(self.feature_extractor(torch.zeros(1, 3, *input_size, device=device)).values()))
        return torch.Size(first.shape[-2:])

    @torch.no_grad()
    def initialize_centroid_from_features(self, batches: Iterable[torch.Tensor]) -> None:
        """anomalib's memory bank from cached :meth:`patch_features` batches.

        The mean target feature per position over the training images, ``(D', h·w)``; k-means to
        ``h·w / gamma_c`` centres when ``gamma_c > 1``.
        """
        total, count = None, 0
        for batch in batches:
            target = self.descriptor.layer(batch.float())
            total = target.sum(dim=0) if total is None else total + target.sum(dim=0)
            count += len(batch)
        assert total is not None, "no training features"
        bank = rearrange(total / count, "c h w -> (h w) c")
        if self.gamma_c > 1:
            _, bank = KMeans(n_clusters=bank.shape[0] // self.gamma_c, max_iter=3000).fit(bank)
        self.memory_bank = rearrange(bank.detach(), "n c -> c n").contiguous()

    def initialize_centroid(self, data_loader: Iterable) -> None:  # type: ignore[override]
        """anomalib's hook (Lightning ``on_train_start``): batches of an anomalib loader or plain tensors."""
        device = next(self.feature_extractor.parameters()).device
        images = (getattr(batch, "image", batch) for batch in data_loader)
        self.initialize_centroid_from_features(self.patch_features(image.to(device)) for image in images)

    @torch.no_grad()
    def score(
        self, images: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores ``(B,)`` (map maximum over the image's own pixels) and maps ``(B, H, W)``."""
        target = self.descriptor(self.feature_extractor(images))
        distance = self.compute_distance(target)
        maps = self.anomaly_map_generator(
            distance=distance, scale=target.shape[-2:], image_size=images.shape[-2:], valid=valid
        )[:, 0]
        flat = maps.flatten(1)
        if valid is not None:
            flat = torch.where(valid.flatten(1), flat, torch.full_like(flat, -math.inf))
        return flat.amax(dim=1), maps

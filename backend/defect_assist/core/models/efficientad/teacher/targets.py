"""The distillation targets: standardised features of an offline ImageNet backbone, with context."""

from __future__ import annotations

import timm
import torch
from torch import nn
from torch.nn import functional as F

from defect_assist.core import backbones

TARGET_BLOCKS = {"8": 2, "16": 3}  # target stride -> timm feature index (EfficientNet-Lite)


def parse_strides(strides: str) -> list[str]:
    """``"8"``, ``"16"`` or ``"8+16"`` -> the target strides, in order."""
    parts = [p.strip() for p in str(strides).split("+") if p.strip()]
    if not parts or any(p not in TARGET_BLOCKS for p in parts):
        raise ValueError(f"target strides must be '8', '16' or '8+16', got {strides!r}")
    return parts


class BackboneTargets(nn.Module):
    """Standardised, locally averaged stride-8 + stride-16 features of an offline ImageNet backbone.

    With ``context`` > 0 the backbone sees a window ``context`` pixels larger on every side than the
    PDN's crop and the targets are the window's centre cells (:meth:`split`): the backbone's large
    receptive field then sees real image content instead of zero padding at the crop borders, so the
    targets of a small crop equal those of the same region inside a whole image.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: bool = True,
        context: int = 0,
        strides: str = "8+16",
    ) -> None:
        super().__init__()
        if context % 4:
            raise ValueError("context must be a multiple of 4 (the PDN's output stride)")
        self.context = context

        spec = backbones.get_spec(backbone)
        self.extractor = timm.create_model(
            spec.timm_name,
            features_only=True,
            out_indices=tuple(TARGET_BLOCKS[s] for s in parse_strides(strides)),
            pretrained=False,
        )
        if pretrained:
            backbones.load_into(self.extractor, spec.timm_name)
        self.extractor.eval().requires_grad_(False)
        self.channels = int(sum(self.extractor.feature_info.channels()))
        self.register_buffer("in_mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
        self.register_buffer("in_std", torch.tensor(spec.std).view(1, 3, 1, 1))
        self.register_buffer("mean", torch.zeros(1, self.channels, 1, 1))
        self.register_buffer("std", torch.ones(1, self.channels, 1, 1))

    @torch.no_grad()
    def raw(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` in [0, 1] at PDN resolution -> features on a grid of ``size / 4``."""
        x = F.interpolate(images, scale_factor=2.0, mode="bilinear", align_corners=False)
        grid = (x.shape[-2] // 8, x.shape[-1] // 8)  # the stride-8 grid = the PDN's stride-4 grid
        features = [F.avg_pool2d(f, 3, 1, 1) for f in self.extractor((x - self.in_mean) / self.in_std)]
        features = [
            f if f.shape[-2:] == grid else F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            for f in features
        ]
        return torch.cat(features, dim=1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.raw(images) - self.mean) / self.std

    def _centre(self, features: torch.Tensor) -> torch.Tensor:
        m = self.context // 4
        return features[..., m : features.shape[-2] - m, m : features.shape[-1] - m] if m else features

    @torch.no_grad()
    def split(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows (crop + context) -> (PDN input crops, standardised targets on the crops' output grid)."""
        c = self.context
        crops = windows[..., c : windows.shape[-2] - c, c : windows.shape[-1] - c] if c else windows
        return crops, self._centre(self(windows))

    @torch.no_grad()
    def estimate_statistics(self, batches: list[torch.Tensor]) -> None:
        feats = torch.cat(
            [self._centre(self.raw(b)).permute(0, 2, 3, 1).reshape(-1, self.channels) for b in batches]
        )
        self.mean.copy_(feats.mean(0).view(1, -1, 1, 1))
        self.std.copy_(feats.std(0).clamp_min(1e-6).view(1, -1, 1, 1))

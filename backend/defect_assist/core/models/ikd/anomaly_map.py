"""IKD's anomaly map: per-level teacher-student discrepancy, upsampled, combined, Gaussian smoothed.

For every level ``l`` the map ``a_l = 1 − cos(f_t,l, f_s,l)`` (eq. (1) of :mod:`.loss`) is upsampled
bilinearly to the input size; the levels are averaged (``combine="sum"``) or multiplied
(``"product"``, STPM's rule) and blurred by a separable Gaussian whose 1-D kernel is built once here.
Given the mask of real image pixels (letterboxed inputs) the blur is a normalised convolution over
those pixels, ``blur(a · valid) / blur(valid)``, so padding does not dilute the image border.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from defect_assist.core.models.ikd.loss import discrepancy

COMBINE = ("sum", "product")


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian of radius ``int(4σ + 0.5)`` (anomalib's kernel size)."""
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma * sigma))
    return kernel / kernel.sum()


class AnomalyMapGenerator(nn.Module):
    """Teacher/student features of every level -> anomaly maps ``(B, 1, H, W)``."""

    kernel: torch.Tensor

    def __init__(self, sigma: float = 4.0, combine: str = "sum") -> None:
        super().__init__()
        if combine not in COMBINE:
            raise ValueError(f"map_combine must be one of {COMBINE}; got {combine!r}")
        self.sigma, self.combine = float(sigma), combine
        # non-persistent: follows .to(device), derived from sigma, not in the state dict
        self.register_buffer("kernel", gaussian_kernel(self.sigma), persistent=False)

    def blur(self, maps: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur of ``(B, 1, H, W)`` maps (reflect padding, replicate when too small)."""
        kernel = self.kernel.to(maps)
        radius = (kernel.numel() - 1) // 2
        if radius == 0:
            return maps
        mode = "reflect" if radius < min(maps.shape[-2:]) else "replicate"
        padded = F.pad(maps, (radius, radius, radius, radius), mode=mode)
        return F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))

    def level_maps(
        self, teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], size: tuple[int, int]
    ) -> list[torch.Tensor]:
        """Per-level discrepancy maps upsampled to ``size``, each ``(B, 1, H, W)``."""
        return [
            F.interpolate(discrepancy(t, s)[:, None], size=size, mode="bilinear", align_corners=False)
            for t, s in zip(teacher, student, strict=True)
        ]

    def forward(
        self,
        teacher: Sequence[torch.Tensor],
        student: Sequence[torch.Tensor],
        image_size: tuple[int, int] | torch.Size,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        maps = self.level_maps(teacher, student, (int(image_size[0]), int(image_size[1])))
        stacked = torch.stack(maps)
        combined = stacked.mean(dim=0) if self.combine == "sum" else stacked.prod(dim=0)
        if valid is None:
            return self.blur(combined)
        weights = valid[:, None].to(combined.dtype)
        return self.blur(combined * weights) / self.blur(weights).clamp_min(1e-6) * weights

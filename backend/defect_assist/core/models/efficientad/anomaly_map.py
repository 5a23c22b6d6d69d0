"""EfficientAd's anomaly maps: the distance grids extended over the image border and resized to the image.

Without PDN padding the output grid misses ``PDN_MAP_MARGIN`` cells on every side. anomalib pads the
maps there with zeros (``border="zeros"``, anomalib's computation exactly): a zero distance, i.e.
"certainly normal", so a defect touching the image border (tile breaks, edge bands) cannot score
there; at 128 px that margin is 16 px of every side, a quarter of the image. ``"replicate"`` (our
default) extends the nearest computed cell instead. A padded PDN's grid already covers the image: no
margin (``margin=0``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

MAP_BORDERS = ("replicate", "zeros")
PDN_MAP_MARGIN = 4  # cells the unpadded PDN's output grid lacks on each side (stride 4: 16 px)


class AnomalyMapGenerator(nn.Module):
    """Distance grids ``(B, 1, h, w)`` -> maps ``(B, 1, H, W)``: margin added (``border``), resized."""

    def __init__(self, border: str = "replicate", margin: int = PDN_MAP_MARGIN) -> None:
        super().__init__()
        if border not in MAP_BORDERS:
            raise ValueError(f"map_border must be one of {MAP_BORDERS}; got {border!r}")
        self.border = border
        self.padding = (margin,) * 4
        self.mode = "constant" if border == "zeros" else "replicate"

    def compute_anomaly_map(
        self, grid: torch.Tensor, image_size: tuple[int, int] | torch.Size
    ) -> torch.Tensor:
        if any(self.padding):
            grid = F.pad(grid, self.padding, mode=self.mode)
        return F.interpolate(grid, size=image_size, mode="bilinear")

    def forward(self, grid: torch.Tensor, image_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        return self.compute_anomaly_map(grid, image_size)

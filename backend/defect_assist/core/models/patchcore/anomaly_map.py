"""PatchCore's anomaly map: anomalib's (nearest upsampling, then a Gaussian blur), two changes.

* The blur is separable (a row then a column pass of one 1-D kernel): the same result as anomalib's
  2-D ``GaussianBlur2d`` (radius 4σ, reflect padding; its kernel is the outer product of two 1-D
  ones) at ``2k`` instead of ``k²`` multiplications per pixel, so a large σ costs little; σ may be
  fractional (anomalib truncates it to an int).
* Letterboxed inputs: given the mask of real image pixels, the map is a normalised convolution over
  those pixels, ``blur(map · valid) / blur(valid)``, so the low scores of the padding (present in
  every training image) do not dilute the scores along the image border.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def gaussian_kernel(
    sigma: float, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.Tensor:
    """The normalised 1-D Gaussian of radius ``int(4σ + 0.5)`` (anomalib's kernel size)."""
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma * sigma))
    return kernel / kernel.sum()


def separable_blur(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Blur ``(B, 1, H, W)`` maps with the 1-D ``kernel`` along rows then columns (reflect padding).

    Replicate padding where the map is too small for a reflection (radius >= side).
    """
    radius = (kernel.numel() - 1) // 2
    mode = "reflect" if radius < min(maps.shape[-2:]) else "replicate"
    padded = F.pad(maps, (radius, radius, radius, radius), mode=mode)
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """One-off :func:`separable_blur` with a kernel built for this call (prefer the module's)."""
    return separable_blur(maps, gaussian_kernel(sigma, maps.dtype, maps.device))


class AnomalyMapGenerator(nn.Module):
    """anomalib's PatchCore ``AnomalyMapGenerator`` with the separable blur and valid-pixel smoothing.

    The kernel is built once here (a non-persistent buffer: it follows ``.to(device)`` and is not
    saved, being derived from ``sigma``) and cast to the maps' dtype at call time.
    """

    kernel: torch.Tensor

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.sigma = float(sigma)
        self.register_buffer("kernel", gaussian_kernel(self.sigma), persistent=False)

    def blur(self, maps: torch.Tensor) -> torch.Tensor:
        return separable_blur(maps, self.kernel.to(maps))

    def forward(
        self,
        patch_scores: torch.Tensor,
        image_size: tuple[int, int] | torch.Size | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Anomaly maps ``(B, 1, H, W)`` from patch scores ``(B, 1, h, w)``.

        ``image_size``: upsample to it (nearest, as anomalib), ``None`` keeps the patch grid.
        ``valid`` (``(B, H, W)`` bool, optional): real image pixels (letterbox padding ``False``); the
        maps are then upsampled to its size, smoothed over it and zero outside it.
        """
        size = valid.shape[-2:] if valid is not None else image_size
        maps = patch_scores if size is None else F.interpolate(patch_scores, size=(size[0], size[1]))
        if valid is None:
            return self.blur(maps)
        weights = valid[:, None].to(maps.dtype)
        smoothed = self.blur(maps * weights) / self.blur(weights).clamp_min(1e-6)
        return smoothed * weights

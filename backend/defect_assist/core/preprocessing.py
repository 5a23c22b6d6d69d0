"""Resizing images to the model's input and mapping anomaly maps back to the original pixels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

ResizeMode = Literal["letterbox", "squash"]


@dataclass(frozen=True)
class Placement:
    """Where an original image sits inside the square model input: ``(top, left, height, width)``."""

    top: int
    left: int
    height: int
    width: int
    original_height: int
    original_width: int


def fit_into_square(
    image: np.ndarray, size: int, mode: ResizeMode, fill: int = 0
) -> tuple[np.ndarray, Placement]:
    """Resize an ``HxWx3`` uint8 image into ``size x size``.

    ``letterbox`` keeps the aspect ratio and pads the short side (centred); ``squash`` stretches.
    """
    height, width = image.shape[:2]
    if mode == "squash":
        resized = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
        return resized, Placement(0, 0, size, size, height, width)
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    canvas = np.full((size, size, 3), fill, dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas, Placement(top, left, new_h, new_w, height, width)


def to_tensor(images: list[np.ndarray], mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Stack uint8 RGB arrays into a normalised float ``Bx3xHxW`` tensor."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return (batch - mean_t) / std_t


def valid_region(maps: np.ndarray, placement: Placement) -> np.ndarray:
    """Crop model-resolution maps (``...xSxS``) to the area covered by the image (padding removed)."""
    size = maps.shape[-1]
    scale = size / maps.shape[-1]
    top, left = round(placement.top / scale), round(placement.left / scale)
    return maps[..., top : top + placement.height, left : left + placement.width]


def map_to_original(anomaly_map: np.ndarray, placement: Placement) -> np.ndarray:
    """Map a ``SxS`` model-resolution anomaly map back to the original ``HxW`` image (bilinear)."""
    region = valid_region(anomaly_map, placement)
    tensor = torch.from_numpy(np.ascontiguousarray(region, dtype=np.float32))[None, None]
    resized = F.interpolate(
        tensor,
        size=(placement.original_height, placement.original_width),
        mode="bilinear",
        align_corners=False,
    )
    return resized[0, 0].numpy()

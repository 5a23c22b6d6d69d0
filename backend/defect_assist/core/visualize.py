"""Writing masks and heatmap overlays as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from defect_assist.core.images import ImageSource, load_image


def heatmap_colors(values: np.ndarray) -> np.ndarray:
    """Map 0–1 values to an RGB 'jet'-like colour ramp (``HxWx3`` uint8), no matplotlib needed."""
    v = np.clip(values, 0.0, 1.0)
    red = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)


def save_mask(mask: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return path


def overlay(image: ImageSource, anomaly_map: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image with its anomaly map blended on top (``HxWx3`` uint8)."""
    rgb = load_image(image).astype(np.float32)
    colours = heatmap_colors(anomaly_map).astype(np.float32)
    return (rgb * (1 - alpha) + colours * alpha).round().astype(np.uint8)


def save_heatmap(image: ImageSource, anomaly_map: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(image, anomaly_map)).save(path)
    return path

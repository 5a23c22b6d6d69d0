"""Image batches as a model sees them: decoded, resized into the input square, errors kept apart."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from defect_assist.core.images import ImageLoadError, ImageSource, collect_images, load_image
from defect_assist.core.preprocessing import Placement

logger = logging.getLogger(__name__)


def as_sources(images: Sequence[ImageSource] | str | Path) -> list[ImageSource]:
    if isinstance(images, str | Path):
        found = collect_images([images])
        if not found:
            raise FileNotFoundError(f"no images found in {images}")
        return list(found)
    return list(images)


@dataclass
class LoadedBatch:
    """Images of a batch that decoded, their placements, and the errors of those that did not."""

    indices: list[int]
    tensor: torch.Tensor | None
    placements: list[Placement]
    errors: dict[int, str]

    def valid_mask(self, size: int, device: torch.device) -> torch.Tensor:
        """``B x S x S`` bool: True where the pixel belongs to the image, False on padding."""
        mask = torch.zeros(len(self.placements), size, size, dtype=torch.bool, device=device)
        for i, p in enumerate(self.placements):
            mask[i, p.top : p.top + p.height, p.left : p.left + p.width] = True
        return mask


def readable(sources: list[ImageSource]) -> list[ImageSource]:
    """The sources that decode; the others are skipped with a warning."""
    found = []
    for source in sources:
        try:
            load_image(source)
        except ImageLoadError as error:
            logger.warning("skipping training image: %s", error)
            continue
        found.append(source)
    return found

"""Penalty images: natural images from a local ``ImageFolder`` instead of the imagenette download."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms.v2 import CenterCrop, Compose, RandomGrayscale, Resize, ToDtype, ToImage


class PenaltyImages:
    """Endless batch-1 stream of natural images from a local ``ImageFolder`` (anomalib's transforms)."""

    def __init__(self, folder: str | Path, image_size: int, seed: int = 0) -> None:
        if not Path(folder).is_dir():
            raise FileNotFoundError(
                f"penalty image folder {folder} not found (one sub-folder per class, as ImageNet)"
            )
        transform = Compose(
            [
                ToImage(),
                Resize((image_size * 2, image_size * 2), antialias=True),
                RandomGrayscale(p=0.3),
                CenterCrop((image_size, image_size)),
                ToDtype(torch.float32, scale=True),
            ]
        )
        self.dataset = ImageFolder(str(folder), transform=transform)
        self.generator = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(self.dataset, batch_size=1, shuffle=True, generator=self.generator)
        self._iterator: Iterator = iter(self.loader)

    def __len__(self) -> int:
        return len(self.dataset)

    def next(self) -> torch.Tensor:
        try:
            return next(self._iterator)[0]
        except StopIteration:
            self._iterator = iter(self.loader)
            return next(self._iterator)[0]

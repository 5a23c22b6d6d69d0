"""Natural images to distil from: listing, a stable held-out split, and the crop dataset."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from defect_assist.core.images import IMAGE_EXTENSIONS


def list_natural_images(folder: str | Path) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images under {folder}")
    return files


def split_holdout(files: list[Path], fraction: float) -> tuple[list[Path], list[Path]]:
    """Deterministic split by file-name hash (stable when files are added)."""

    def bucket(path: Path) -> float:
        return int(hashlib.sha256(path.name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    held = [p for p in files if bucket(p) < fraction]
    train = [p for p in files if bucket(p) >= fraction]
    if not train:
        train, held = files, []
    return train, held


class NaturalImages(torch.utils.data.Dataset):
    """Natural images as ``[0, 1]`` RGB crops; augmented for training, centre crops for evaluation."""

    def __init__(self, files: list[Path], crop_size: int, train: bool) -> None:
        """``crop_size`` here is the full window (PDN crop plus context on both sides)."""
        self.files = files
        if train:
            self.transform = v2.Compose(
                [
                    v2.RandomResizedCrop(crop_size, scale=(0.15, 1.0), antialias=True),
                    v2.RandomHorizontalFlip(),
                    v2.RandomApply([v2.ColorJitter(0.3, 0.3, 0.3, 0.05)], p=0.8),
                    v2.RandomGrayscale(p=0.2),
                ]
            )
        else:
            self.transform = v2.Compose([v2.Resize(crop_size, antialias=True), v2.CenterCrop(crop_size)])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.files[index]) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
        return self.transform(tensor).float() / 255.0

"""Walk an image folder into records with split, label and defect type (MVTec AD layout aware).

An MVTec-layout category (``train/good``, ``test/<type>``, ``ground_truth/<type>/<stem>_mask.png``)
gives every image its split, label (``normal`` for ``good``, else ``anomalous``), defect type and mask;
a root holding several such categories is walked category by category. Any other folder yields its
images with unknown split and label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from defect_assist.core.evaluation import discover_categories
from defect_assist.core.images import collect_images


@dataclass(frozen=True)
class ImageRecord:
    """One image and what its location says about it."""

    path: Path
    split: str | None = None  # train | test | None (unknown)
    label: str | None = None  # normal | anomalous | None (unknown)
    defect_type: str | None = None  # "good" for normals of an MVTec layout
    mask_path: Path | None = None
    category: str | None = None


def is_mvtec_layout(folder: Path) -> bool:
    """True when ``folder`` is an MVTec category or a root of categories."""
    folder = Path(folder)
    if (folder / "train" / "good").is_dir():
        return True
    return folder.is_dir() and any((p / "train" / "good").is_dir() for p in folder.iterdir() if p.is_dir())


def walk_folder(folder: str | Path) -> list[ImageRecord]:
    """Records for every image under ``folder`` (a single image file is accepted too)."""
    folder = Path(folder)
    if folder.is_dir() and is_mvtec_layout(folder):
        records: list[ImageRecord] = []
        for category in discover_categories(folder):
            records += [
                ImageRecord(p, "train", "normal", "good", None, category.name) for p in category.train
            ]
            for image in category.test:
                label = "anomalous" if image.is_anomalous else "normal"
                records.append(
                    ImageRecord(image.path, "test", label, image.defect_type, image.mask_path, category.name)
                )
        return records
    return [ImageRecord(path) for path in collect_images([folder])]

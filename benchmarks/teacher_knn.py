"""How useful an EfficientAd teacher's features are for defects: k-NN anomaly detection with them.

Usage: ``python benchmarks/teacher_knn.py TEACHER [TEACHER ...] [--data DIR] [--image-size 128]``,
where TEACHER is a ``teacher.pth`` (anomalib's PDN keys), ``random`` (a randomly initialised PDN) or
``lite0`` (the distillation targets themselves: EfficientNet-Lite0's stride-8 block on the 2x image).

Each image is squashed to ``image-size`` (as EfficientAd sees it); the unpadded PDN's output cells
are standardised per channel with statistics of the training normals. A memory bank of random cells
from ``--train`` training normals scores every test cell by its nearest-neighbour distance
(PatchCore-style, no coreset); image score = the largest cell distance. Prints image AUROC and pixel
AUROC (cell distances bilinearly resized to the image size) as JSON lines. No training: it compares
teachers, not EfficientAd models.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from defect_assist.core.evaluation import image_auroc, load_category, read_mask
from defect_assist.core.models.efficientad.teacher.network import build_pdn
from defect_assist.core.models.efficientad.teacher.targets import BackboneTargets


def load_square(path: Path, size: int) -> torch.Tensor:
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def feature_function(teacher: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if teacher == "lite0":
        return BackboneTargets("tf_efficientnet_lite0", context=0, strides="8").eval().raw
    pdn = build_pdn("small", padding=False).eval()
    if teacher != "random":
        pdn.load_state_dict(torch.load(teacher, map_location="cpu", weights_only=True))
    return pdn


@torch.no_grad()
def features(extract: Callable[[torch.Tensor], torch.Tensor], paths: list[Path], size: int) -> torch.Tensor:
    return torch.cat(
        [
            extract(torch.stack([load_square(p, size) for p in paths[i : i + 16]]))
            for i in range(0, len(paths), 16)
        ]
    )


@torch.no_grad()
def evaluate_teacher(teacher: str, data: Path, size: int, n_train: int, bank_size: int, seed: int) -> dict:
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    category = load_category(data)
    extract = feature_function(teacher)
    train = [
        category.train[i]
        for i in rng.choice(len(category.train), min(n_train, len(category.train)), replace=False)
    ]
    cells = features(extract, train, size)
    channels = cells.shape[1]
    cells = cells.permute(0, 2, 3, 1).reshape(-1, channels)
    mean, std = cells.mean(0), cells.std(0) + 1e-6
    keep = torch.from_numpy(rng.choice(len(cells), min(bank_size, len(cells)), replace=False))
    bank = ((cells - mean) / std)[keep]

    test = features(extract, [t.path for t in category.test], size)
    h, w = test.shape[-2:]
    queries = (test.permute(0, 2, 3, 1).reshape(-1, channels) - mean) / std
    distances = torch.cat(
        [torch.cdist(queries[i : i + 8192], bank).amin(1) for i in range(0, len(queries), 8192)]
    )
    grid = distances.view(-1, 1, h, w)
    maps = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    labels = np.array([int(t.is_anomalous) for t in category.test])
    masks = np.stack(
        [
            np.asarray(
                Image.fromarray(read_mask(t.mask_path).astype(np.uint8) * 255).resize(
                    (size, size), Image.NEAREST
                )
            )
            > 0
            if t.mask_path
            else np.zeros((size, size), bool)
            for t in category.test
        ]
    )
    return {
        "teacher": teacher,
        "image_size": size,
        "grid": [h, w],
        "bank_cells": len(bank),
        "image_auroc": round(image_auroc(grid.flatten(1).amax(1).numpy(), labels), 4),
        "pixel_auroc": round(image_auroc(maps.reshape(-1), masks.reshape(-1)), 4),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("teachers", nargs="+", help="teacher.pth files, 'random' or 'lite0'")
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/magnetic_tile"))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--train", type=int, default=300, help="training normals in the memory bank")
    parser.add_argument("--bank", type=int, default=30_000, help="random cells kept in the memory bank")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for teacher in args.teachers:
        result = evaluate_teacher(teacher, args.data, args.image_size, args.train, args.bank, args.seed)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

"""Which smoothing and mask rule serve masks shaped like the defects? (issue 15)

Reads the patch-score grids cached by ``benchmarks/mask_grids.py`` and, for each map smoothing σ
(pixels of a 256 px input) and mask rule, prints the served mask Dice on the defect images of one
half of ``test/`` (``--split validation`` to choose; ``holdout`` to report once), the share of normals
given a mask and the anomalous verdicts without a mask. Thresholds come from the held-out *normal*
images only (no defect label is used): the verdict at the 0.90-quantile of their image scores, the
pixel thresholds at quantiles of their map values.

Rules (each applied to the anomalous verdicts only, so every mask agrees with its verdict):

* ``absolute q``: pixels above the ``q``-quantile of normal map values;
* ``relative a``: pixels above ``floor + a · (peak − floor)``, ``floor`` the 0.999-quantile of normal
  pixels, ``peak`` the image's map maximum: the region is cut relative to the image's own peak, so
  a faint small defect and a strong large one both get their shape;
* ``+peak``: where the rule leaves an anomalous verdict empty, the connected region around the map's
  maximum above ``base + 0.5 · (peak − base)``, ``base`` the median normal pixel.

    python benchmarks/mask_rules.py artifacts/mask-grids/default.npz --split validation
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from defect_assist.core.evaluation import EVAL_SIZE
from defect_assist.core.models.patchcore.anomaly_map import AnomalyMapGenerator
from defect_assist.core.served_metrics import dice_iou


def valid_masks(places: np.ndarray, size: int) -> torch.Tensor:
    valid = torch.zeros(len(places), size, size, dtype=torch.bool)
    for i, (top, left, height, width, *_) in enumerate(places):
        valid[i, top : top + height, left : left + width] = True
    return valid


def eval_maps(grids: np.ndarray, places: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """Maps of the image area at ``EVAL_SIZE`` (as evaluate compares masks)."""
    generator = AnomalyMapGenerator(sigma * size / 256)
    out = np.empty((len(grids), EVAL_SIZE, EVAL_SIZE), np.float32)
    for start in range(0, len(grids), 32):
        grid = torch.from_numpy(grids[start : start + 32])[:, None]
        valid = valid_masks(places[start : start + 32], size)
        maps = generator(grid, None, valid)[:, 0]
        for j, (top, left, height, width, *_) in enumerate(places[start : start + 32]):
            region = maps[j, top : top + height, left : left + width][None, None]
            out[start + j] = F.interpolate(
                region, size=(EVAL_SIZE, EVAL_SIZE), mode="bilinear", align_corners=False
            )[0, 0]
    return out


def peak_region(anomaly_map: np.ndarray, level: float) -> np.ndarray:
    labels, _ = ndimage.label(anomaly_map >= level)
    peak = labels[np.unravel_index(np.argmax(anomaly_map), anomaly_map.shape)]
    return labels == peak if peak else np.zeros_like(anomaly_map, bool)


def score_rule(masks: list[np.ndarray], verdicts: np.ndarray, truths: np.ndarray, types: np.ndarray) -> dict:
    defect = types != "good"
    dice = np.array([dice_iou(m, t)[0] for m, t, d in zip(masks, truths, defect, strict=True) if d])
    per_type = defaultdict(list)
    for value, kind in zip(dice, types[defect], strict=True):
        per_type[kind].append(value)
    return {
        "dice": float(dice.mean()),
        "dice>=.5": float((dice >= 0.5).mean()),
        "normals_masked": float(np.mean([m.any() for m, d in zip(masks, defect, strict=True) if not d])),
        "anom_no_mask": int(sum(1 for m, v in zip(masks, verdicts, strict=True) if v and not m.any())),
        "types": {k: round(float(np.mean(v)), 3) for k, v in sorted(per_type.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("grids")
    parser.add_argument("--split", default="validation", choices=("validation", "holdout", "all"))
    parser.add_argument("--sigmas", default="2,4,6,8,12,16,24")
    parser.add_argument("--image-quantile", type=float, default=0.90)
    args = parser.parse_args()
    data = np.load(args.grids)
    size = int(data["image_size"])
    keep = data["splits"] == args.split if args.split != "all" else np.ones(len(data["splits"]), bool)
    types = data["types"][keep]
    truths = np.unpackbits(data["truths"], axis=-1)[keep, :, :EVAL_SIZE].astype(bool)
    threshold = np.quantile(data["holdout_scores"], args.image_quantile)
    verdicts = data["test_scores"][keep] >= threshold
    defect = types != "good"
    tp, fp = int((verdicts & defect).sum()), int((verdicts & ~defect).sum())
    print(f"{args.split}: {defect.sum()} defect, {(~defect).sum()} normal; verdict tp {tp} fp {fp}")
    for sigma in (float(s) for s in args.sigmas.split(",")):
        normal_maps = eval_maps(data["holdout_grids"], data["holdout_places"], size, sigma)
        maps = eval_maps(data["test_grids"][keep], data["test_places"][keep], size, sigma)
        pixels = normal_maps.reshape(-1)
        floor, base = float(np.quantile(pixels, 0.999)), float(np.median(pixels))
        rules: dict[str, list[np.ndarray]] = {}
        for q in (0.99, 0.999, 0.9999):
            level = float(np.quantile(pixels, q))
            rules[f"absolute {q}"] = [(m > level) & v for m, v in zip(maps, verdicts, strict=True)]
        for a in (0.2, 0.35, 0.5, 0.65):
            rules[f"relative {a}"] = [
                (m > floor + a * max(m.max() - floor, 0)) & (m > floor) & v
                for m, v in zip(maps, verdicts, strict=True)
            ]
        for name in list(rules):
            rules[f"{name} +peak"] = [
                r if (r.any() or not v) else peak_region(m, base + 0.5 * (m.max() - base))
                for r, m, v in zip(rules[name], maps, verdicts, strict=True)
            ]
        for name, masks in rules.items():
            result = score_rule(masks, verdicts, truths, types)
            print(
                f"σ {sigma:>4} {name:<22} dice {result['dice']:.3f} ≥.5 {result['dice>=.5']:.2f} "
                f"normals {result['normals_masked']:.3f} anom∅ {result['anom_no_mask']:>3} {result['types']}"
            )


if __name__ == "__main__":
    main()

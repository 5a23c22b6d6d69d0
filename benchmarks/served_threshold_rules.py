"""Which image/pixel threshold rule serves recall without defect labels? (issue 15)

Fits PatchCore on the train normals minus 65 kept aside, makes synthetic anomalies from those 65
(a rotated cut-paste patch, a dark/bright blob, a scratch: three per image), scores the kept normals,
the synthetic anomalies and the *validation* half of ``test/`` (``evaluation.split_of``), then prints
precision/recall/F1 on the validation half for each rule: quantiles of the kept normals' scores and
the F1-optimal threshold between kept normals and synthetic anomalies; and mask Dice at pixel
thresholds. The holdout half is never scored here: it is for reporting the chosen rule
(``defect-assist evaluate --split holdout``).

    python benchmarks/served_threshold_rules.py [--data ../shared/datasets/magnetic_tile]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from defect_assist.core.evaluation import load_category, read_mask, resize_for_eval, split_of
from defect_assist.core.models.registry import create_model
from defect_assist.core.settings import get_settings

KINDS = ("cutpaste", "blob", "scratch")


def synthetic_anomaly(
    path: Path, donor: Path, kind: str, rng: random.Random
) -> tuple[Image.Image, Image.Image]:
    """A normal image with one pasted defect, and its mask."""
    image = Image.open(path).convert("L")
    width, height = image.size
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "cutpaste":
        source = Image.open(donor).convert("L").resize((width, height))
        pw, ph = max(4, int(width * rng.uniform(0.08, 0.25))), max(4, int(height * rng.uniform(0.08, 0.25)))
        x0, y0 = rng.randrange(0, width - pw), rng.randrange(0, height - ph)
        patch = source.crop((x0, y0, x0 + pw, y0 + ph)).rotate(rng.choice([90, 180, 270]))
        contrast = np.asarray(patch, np.float32) * rng.uniform(0.5, 1.5)
        patch = Image.fromarray(np.clip(contrast, 0, 255).astype(np.uint8))
        x, y = rng.randrange(0, width - pw), rng.randrange(0, height - ph)
        image = image.copy()
        image.paste(patch, (x, y))
        draw.rectangle([x, y, x + pw - 1, y + ph - 1], fill=255)
        return image, mask
    if kind == "blob":
        rx, ry = int(width * rng.uniform(0.03, 0.12)), int(height * rng.uniform(0.03, 0.12))
        cx, cy = rng.randrange(rx, width - rx), rng.randrange(ry, height - ry)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    else:
        points = [(rng.randrange(0, width), rng.randrange(0, height))]
        for _ in range(3):
            x = min(width - 1, max(0, points[-1][0] + rng.randint(-width // 4, width // 4)))
            y = min(height - 1, max(0, points[-1][1] + rng.randint(-height // 4, height // 4)))
            points.append((x, y))
        draw.line(points, fill=255, width=max(2, int(min(width, height) * rng.uniform(0.01, 0.03))))
    soft = np.asarray(mask.filter(ImageFilter.GaussianBlur(1.5)), np.float32) / 255
    factor = rng.choice([rng.uniform(0.3, 0.65), rng.uniform(1.35, 1.8)])
    pixels = np.asarray(image, np.float32)
    pixels = pixels * (1 - soft) + np.clip(pixels * factor, 0, 255) * soft
    return Image.fromarray(pixels.astype(np.uint8)), mask


def precision_recall(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float, float]:
    predicted = scores >= threshold
    tp, fp = float((predicted & labels).sum()), float((predicted & ~labels).sum())
    fn = float((~predicted & labels).sum())
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return precision, recall, 2 * precision * recall / max(precision + recall, 1e-9)


def f1_optimal(negatives: np.ndarray, positives: np.ndarray) -> float:
    candidates = np.unique(np.concatenate([negatives, positives]))
    labels = np.concatenate([np.zeros(len(negatives), bool), np.ones(len(positives), bool)])
    scores = np.concatenate([negatives, positives])
    return float(max(candidates, key=lambda t: precision_recall(scores, labels, t)[2]))


def dice(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    intersection = (predicted & truth).sum((1, 2))
    total = predicted.sum((1, 2)) + truth.sum((1, 2))
    return np.where(total > 0, 2 * intersection / np.maximum(total, 1), 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=get_settings().datasets_dir / "magnetic_tile")
    parser.add_argument("--out", type=Path, default=Path("var/benchmarks/served-thresholds"))
    parser.add_argument("--kept", type=int, default=65, help="Train normals kept aside (not trained on).")
    args = parser.parse_args()
    category = load_category(args.data)
    rng = random.Random(0)
    train = list(category.train)
    rng.shuffle(train)
    kept, fit_on = train[: args.kept], train[args.kept :]
    (args.out / "synthetic").mkdir(parents=True, exist_ok=True)
    synthetic = []
    for i, path in enumerate(kept):
        for kind in KINDS:
            image, mask = synthetic_anomaly(path, kept[(i + 7) % len(kept)], kind, rng)
            image_path = args.out / "synthetic" / f"{i:03d}_{kind}.png"
            image.save(image_path)
            mask.save(image_path.with_suffix(".mask.png"))
            synthetic.append((image_path, image_path.with_suffix(".mask.png")))
    model = create_model("patchcore", device="cpu")
    started = time.perf_counter()
    model.fit(fit_on, seed=0)
    print(f"fit on {len(fit_on)} normals in {time.perf_counter() - started:.0f} s")
    validation = [t for t in category.test if split_of(t) == "validation"]

    def scored(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        predictions = model.predict(paths)
        maps = np.stack([resize_for_eval(p.anomaly_map, is_mask=False).numpy() for p in predictions])
        return np.array([p.score for p in predictions]), maps

    kept_scores, _ = scored(kept)
    synthetic_scores, synthetic_maps = scored([s[0] for s in synthetic])
    scores, maps = scored([t.path for t in validation])
    labels = np.array([t.is_anomalous for t in validation])
    truths = np.stack(
        [
            resize_for_eval(read_mask(t.mask_path), is_mask=True).numpy() > 0
            if t.mask_path
            else np.zeros(maps.shape[1:], bool)
            for t in validation
        ]
    )
    synthetic_truths = np.stack(
        [resize_for_eval(np.asarray(Image.open(m)) > 0, is_mask=True).numpy() > 0 for _, m in synthetic]
    )
    print(f"validation half: {len(validation)} images, {int(labels.sum())} defective")
    print("| image threshold rule | threshold | precision | recall | F1 |\n|---|---|---|---|---|")
    rules = {f"{q:.2f}-quantile of kept normals": float(np.quantile(kept_scores, q)) for q in (0.9, 0.95)}
    rules["0.99-quantile of kept normals"] = float(np.quantile(kept_scores, 0.99))
    rules["F1-optimal, kept normals vs synthetic"] = f1_optimal(kept_scores, synthetic_scores)
    for name, threshold in rules.items():
        precision, recall, f1 = precision_recall(scores, labels, threshold)
        print(f"| {name} | {threshold:.3f} | {precision:.3f} | {recall:.3f} | {f1:.3f} |")
    print("| pixel threshold (normalised map) | Dice, validation | Dice, synthetic | normals masked |")
    print("|---|---|---|---|")
    for level in (0.5, 0.6, 0.7, 0.8, 0.9):
        on_defects = dice(maps[labels] >= level, truths[labels]).mean()
        on_synthetic = dice(synthetic_maps >= level, synthetic_truths).mean()
        masked = (maps[~labels] >= level).any((1, 2)).mean()
        print(f"| {level} | {on_defects:.3f} | {on_synthetic:.3f} | {masked:.3f} |")


if __name__ == "__main__":
    main()

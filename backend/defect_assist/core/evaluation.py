"""Benchmark-style evaluation on MVTec-AD-layout folders (MVTec AD, VisA converted, magnetic tile …).

Per category: train on ``train/good``, calibrate on held-out training normals, predict ``test/*``,
and report image AUROC, pixel AUROC, image F1 at the calibrated threshold and the best image F1
(F1-max), pixel AUPRO integrated up to FPR 0.3, fit seconds and inference images per second.
Metric implementations are anomalib's (which build on torchmetrics).

Pixel metrics: anomaly maps (at the original image size) and ground-truth masks are both resized to
``EVAL_SIZE x EVAL_SIZE`` so every image weighs the same, as in the MVTec AD protocol; a mask pixel is
defective when its value is > 0 (anomalib's rule; the soft edges of magnetic-tile masks count as
defect). Normal test images have all-zero masks.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.table import Table
from torch.nn import functional as F

from defect_assist.core.images import IMAGE_EXTENSIONS
from defect_assist.core.labeled_calibration import evaluate_and_calibrate
from defect_assist.core.models.registry import create_model, model_class
from defect_assist.core.progress import ProgressCallback
from defect_assist.core.served_metrics import ServedImage, served_metrics

logger = logging.getLogger(__name__)

EVAL_SIZE = 256
METRIC_KEYS = (
    "image_auroc",
    "pixel_auroc",
    "image_f1",
    "image_f1_max",
    "pixel_aupro",
    "fit_seconds",
    "images_per_second",
)
SERVED_KEYS = ("precision", "recall", "f1", "mean_dice", "mean_iou", "share_dice_ge_0_5", "normals_with_mask")
SPLITS = ("all", "validation", "holdout")
HEAD_NORMALS = 30  # training normals held out as the defect head's negatives when learning from corrections


@dataclass
class TestImage:
    path: Path
    defect_type: str  # "good" for normals
    mask_path: Path | None

    @property
    def is_anomalous(self) -> bool:
        return self.defect_type != "good"


@dataclass
class Category:
    name: str
    root: Path
    train: list[Path]
    test: list[TestImage] = field(default_factory=list)


def split_of(image: TestImage) -> str:
    """``validation`` or ``holdout``: a fixed half of each defect type by file name (choose settings on
    the validation half, report on the holdout half; neither depends on scores or order)."""
    digest = hashlib.sha1(f"{image.defect_type}/{image.path.name}".encode()).digest()
    return "validation" if digest[0] % 2 == 0 else "holdout"


def list_images(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _find_mask(root: Path, defect_type: str, image: Path) -> Path | None:
    folder = root / "ground_truth" / defect_type
    for candidate in (f"{image.stem}_mask.png", f"{image.stem}.png", f"{image.stem}_mask{image.suffix}"):
        if (folder / candidate).exists():
            return folder / candidate
    return None


def load_category(root: Path) -> Category:
    """Read one MVTec-layout category; masks are paired by file stem (not by sort order)."""
    train_dir = root / "train" / "good"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{root} has no train/good folder")
    category = Category(root.name, root, list_images(train_dir))
    test_dir = root / "test"
    if test_dir.is_dir():
        for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            for image in list_images(type_dir):
                mask = None if type_dir.name == "good" else _find_mask(root, type_dir.name, image)
                if type_dir.name != "good" and mask is None:
                    logger.warning("no ground-truth mask for %s; pixel metrics treat it as unlabelled", image)
                category.test.append(TestImage(image, type_dir.name, mask))
    return category


def discover_categories(data: Path) -> list[Category]:
    """``data`` is one category (has train/good) or a root whose sub-folders are categories."""
    data = Path(data)
    if (data / "train" / "good").is_dir():
        return [load_category(data)]
    categories = [load_category(p) for p in sorted(data.iterdir()) if (p / "train" / "good").is_dir()]
    if not categories:
        raise FileNotFoundError(f"{data} is neither an MVTec-layout category nor a root of categories")
    return categories


# ---------------------------------------------------------------------------- metrics
def _unit_range(scores: np.ndarray) -> torch.Tensor:
    """Min-max scale to [0, 1]: torchmetrics treats scores outside [0, 1] as logits and squashes them."""
    scores = np.asarray(scores, dtype=np.float64)
    low, high = (scores.min(), scores.max()) if scores.size else (0.0, 1.0)
    scaled = (scores - low) / (high - low) if high > low else np.zeros_like(scores)
    return torch.as_tensor(scaled, dtype=torch.float32)


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    from anomalib.metrics.auroc import _AUROC

    metric = _AUROC()
    metric.update(_unit_range(scores), torch.as_tensor(labels, dtype=torch.long))
    return float(metric.compute())


def f1_at(predicted: np.ndarray, labels: np.ndarray) -> float:
    from torchmetrics.classification import BinaryF1Score

    return float(
        BinaryF1Score()(
            torch.as_tensor(predicted, dtype=torch.long), torch.as_tensor(labels, dtype=torch.long)
        )
    )


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    from anomalib.metrics.f1_score import _F1Max

    metric = _F1Max()
    metric.update(_unit_range(scores), torch.as_tensor(labels, dtype=torch.long))
    return float(metric.compute())


def pixel_aupro(maps: torch.Tensor, masks: torch.Tensor, fpr_limit: float = 0.3) -> float:
    """AUPRO over ``N x H x W`` maps/masks, normalised to [0, 1] by ``fpr_limit``."""
    from anomalib.metrics.aupro import _AUPRO

    metric = _AUPRO(fpr_limit=fpr_limit)
    metric.update(maps.float(), masks.long())
    return float(metric.compute())


def resize_for_eval(array: np.ndarray, is_mask: bool) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    mode = "nearest" if is_mask else "bilinear"
    kwargs = {} if is_mask else {"align_corners": False}
    return F.interpolate(tensor, size=(EVAL_SIZE, EVAL_SIZE), mode=mode, **kwargs)[0, 0]


def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L")) > 0


# ---------------------------------------------------------------------------- corrections
def choose_corrected(
    tests: list[TestImage], n: int, seed: int = 0
) -> tuple[list[TestImage], list[TestImage]]:
    """``n`` defect images with masks (a fixed pseudo-random order: the first ``n`` of a larger ``n``
    are the same images), and the other test images, which are the only ones scored."""
    candidates = sorted(
        (t for t in tests if t.is_anomalous and t.mask_path is not None),
        key=lambda t: hashlib.sha1(f"{seed}/{t.defect_type}/{t.path.name}".encode()).digest(),
    )
    chosen = {t.path for t in candidates[:n]}
    return candidates[:n], [t for t in tests if t.path not in chosen]


def learn_corrections(model: Any, corrected: list[TestImage], normals: list[Path]) -> dict[str, Any]:
    """What a retrain does with annotators' corrections: the defect head, then thresholds from labels."""
    defects = [(t.path, read_mask(t.mask_path)) for t in corrected if t.mask_path is not None]
    head = model.learn_from_corrections(defects, normals) if model.supports_corrections else {}
    return {
        "n_corrected": len(defects),
        "defect_head": head,
        **evaluate_and_calibrate(model, normals, defects),
    }


# ---------------------------------------------------------------------------- evaluation
def evaluate_category(
    category: Category,
    model_kind: str,
    options: dict[str, Any],
    device: str = "auto",
    max_train: int | None = None,
    progress: ProgressCallback | None = None,
    seed: int = 0,
    split: str = "all",
    corrected: int = 0,
    reserve: int | None = None,
) -> dict[str, Any]:
    """Fit on the category's normals and compute every metric on its test set (or one half of it).

    ``corrected``: learn from that many defect images of the test set with their masks (as a retrain
    does from annotators' corrections) and score the others; ``reserve`` (≥ ``corrected``) keeps that
    many out of scoring whatever ``corrected`` is, so runs with different ``corrected`` score the
    same images.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    train = list(category.train)
    tests = [t for t in category.test if split == "all" or split_of(t) == split]
    if max_train and len(train) > max_train:
        train = sorted(random.Random(seed).sample(train, max_train))
    chosen, tests = choose_corrected(tests, max(corrected, reserve or 0), seed)
    chosen, head_normals = chosen[:corrected], []
    if chosen:
        random.Random(seed).shuffle(train)
        n_head = min(HEAD_NORMALS, len(train) // 4)
        head_normals, train = sorted(train[:n_head]), sorted(train[n_head:])
    model = create_model(model_kind, device=device, **options)
    report = model.fit(train, progress=progress, seed=seed)
    corrections = learn_corrections(model, chosen, head_normals) if chosen else {}
    return {
        **score_model(model, tests, split, progress),
        "fit_seconds": round(report.fit_seconds, 2),
        "n_train": report.n_train,
        "n_holdout": report.n_holdout,
        "fit_details": report.details,
        "corrections": corrections,
    }


def score_model(
    model: Any, tests: list[TestImage], split: str = "all", progress: ProgressCallback | None = None
) -> dict[str, Any]:
    """Every metric of a fitted ``model`` on ``tests``: AUROC, AUPRO, F1 and what is served."""
    started = time.perf_counter()
    predictions = model.predict([t.path for t in tests], progress=progress)
    infer_seconds = time.perf_counter() - started

    labels, raw_scores, verdicts, maps, masks = [], [], [], [], []
    served: list[ServedImage] = []
    kept: list[TestImage] = []  # the test image of each ``served`` entry
    for test, prediction in zip(tests, predictions, strict=True):
        if not prediction.ok:
            logger.warning("skipping unreadable test image %s", prediction.error)
            continue
        kept.append(test)
        labels.append(int(test.is_anomalous))
        raw_scores.append(prediction.raw_score)
        verdicts.append(int(prediction.is_anomalous))
        served_mask = resize_for_eval(prediction.mask, is_mask=True).bool().numpy()
        if test.is_anomalous and test.mask_path is None:
            served.append(ServedImage(test.defect_type, prediction.is_anomalous, served_mask, None))
            continue
        height, width = prediction.anomaly_map.shape
        mask = read_mask(test.mask_path) if test.mask_path else np.zeros((height, width), bool)
        if mask.shape != (height, width):
            mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
        maps.append(resize_for_eval(prediction.anomaly_map, is_mask=False))
        masks.append(resize_for_eval(mask, is_mask=True).bool())
        served.append(ServedImage(test.defect_type, prediction.is_anomalous, served_mask, masks[-1].numpy()))

    labels_np, scores_np = np.asarray(labels), np.asarray(raw_scores)
    config = model.config.to_dict()
    has_both = 0 < labels_np.sum() < len(labels_np)
    result: dict[str, Any] = {
        "image_auroc": image_auroc(scores_np, labels_np) if has_both else math.nan,
        "image_f1": f1_at(np.asarray(verdicts), labels_np) if labels_np.sum() else math.nan,
        "image_f1_max": f1_max(scores_np, labels_np) if has_both else math.nan,
        "pixel_auroc": math.nan,
        "pixel_aupro": math.nan,
        "images_per_second": round(len(predictions) / infer_seconds, 2) if infer_seconds > 0 else math.nan,
        "n_test": len(labels),
        "n_test_anomalous": int(labels_np.sum()),
        "split": split,
        "served": served_metrics(served),
        "served_by_split": {
            name: served_metrics([s for s, t in zip(served, kept, strict=True) if split_of(t) == name])
            for name in SPLITS[1:]
        }
        if split == "all"
        else {},
        "model_config": {k: v for k, v in config.items() if isinstance(v, str | int | float | list)},
    }
    if maps:
        map_stack, mask_stack = torch.stack(maps), torch.stack(masks)
        if mask_stack.any():
            result["pixel_auroc"] = image_auroc(map_stack.reshape(-1).numpy(), mask_stack.reshape(-1).numpy())
            result["pixel_aupro"] = pixel_aupro(map_stack, mask_stack)
    return result


def evaluate_dataset(
    data: Path,
    model_kind: str,
    options: dict[str, Any] | None = None,
    device: str = "auto",
    categories: list[str] | None = None,
    max_train: int | None = None,
    progress: ProgressCallback | None = None,
    split: str = "all",
    corrected: int = 0,
    reserve: int | None = None,
) -> dict[str, Any]:
    """Evaluate every category under ``data``; returns the JSON structure the CLI writes."""
    options = options or {}
    found = discover_categories(data)
    if categories:
        found = [c for c in found if c.name in set(categories)]
        if not found:
            raise ValueError(f"none of the categories {categories} are under {data}")
    per_category = {}
    for category in found:
        logger.info(
            "evaluating %s: %d train, %d test images", category.name, len(category.train), len(category.test)
        )
        per_category[category.name] = evaluate_category(
            category,
            model_kind,
            options,
            device,
            max_train,
            progress,
            split=split,
            corrected=corrected,
            reserve=reserve,
        )
    mean = {
        key: float(np.nanmean([r[key] for r in per_category.values()]))
        if any(not math.isnan(r[key]) for r in per_category.values())
        else math.nan
        for key in METRIC_KEYS
    }
    mean["served"] = {
        key: float(np.nanmean(values)) if not all(math.isnan(v) for v in values) else math.nan
        for key in SERVED_KEYS
        if (values := [r["served"][key] for r in per_category.values()])
    }
    fitted = [r["model_config"] for r in per_category.values() if r.get("model_config")]
    config = fitted[0] if fitted else model_class(model_kind).config_class.from_options(options).to_dict()
    return {
        "categories": per_category,
        "mean": mean,
        "model": model_kind,
        "backbone": config.get("backbone", ""),
        "image_size": config.get("image_size", ""),
        "options": options,
        "pixel_eval": f"{EVAL_SIZE}x{EVAL_SIZE}, mask > 0",
        "split": split,
        "corrected": corrected,
    }


def results_tables(results: dict[str, Any]) -> tuple[Table, Table]:
    """Two rich tables, one row per category plus the mean: how the scores rank (AUROC, AUPRO, F1-max,
    speed), and what is served at the thresholds (verdict precision/recall/F1, mask Dice and IoU)."""
    split = "" if results.get("split", "all") == "all" else f", {results['split']} half of test/"
    title = f"{results['model']} ({results['backbone']}, {results['image_size']} px{split})"
    ranking = Table(title=f"{title}: ranking")
    served = Table(title=f"{title}: served at the thresholds")
    ranking.add_column("category")
    served.add_column("category")
    for column in ("image AUROC", "pixel AUROC", "F1 max", "pixel AUPRO", "fit s", "img/s"):
        ranking.add_column(column, justify="right")
    for column in ("precision", "recall", "F1", "mask Dice", "IoU", "Dice≥0.5", "normals masked"):
        served.add_column(column, justify="right")

    def number(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.3f}"

    def rows(name: str, values: dict[str, Any], style: str | None = None) -> None:
        keys = ("image_auroc", "pixel_auroc", "image_f1_max", "pixel_aupro")
        speed = [f"{values['fit_seconds']:.1f}", f"{values['images_per_second']:.1f}"]
        ranking.add_row(name, *[number(values[k]) for k in keys], *speed, style=style)
        served.add_row(name, *[number(values["served"].get(k, math.nan)) for k in SERVED_KEYS], style=style)

    for name, values in results["categories"].items():
        rows(name, values)
    if len(results["categories"]) > 1:
        rows("mean", results["mean"], style="bold")
    return ranking, served

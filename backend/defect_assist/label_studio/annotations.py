"""Annotations read back from Label Studio: each annotated task reduced to a verdict and a defect mask."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from defect_assist.label_studio.masks import rle_to_mask
from defect_assist.label_studio.vocabulary import is_normal_choice

IMAGE_EXTENSIONS = re.compile(r"\.(jpe?g|png|bmp|tiff?|webp)(\?|$)", re.IGNORECASE)
REGION_TYPES = {"brushlabels", "polygonlabels", "rectanglelabels", "ellipselabels", "keypointlabels"}


@dataclass
class LabeledImage:
    """One annotated task reduced to what training needs."""

    task_id: int
    url: str
    verdict: str  # normal | anomalous
    mask: np.ndarray | None = None  # HxW bool union of brush regions, when any
    regions: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def image_url(task: dict[str, Any]) -> str | None:
    """The task's image URL: ``data.image``, else the first value that looks like an image."""
    data = task.get("data", {})
    if isinstance(data.get("image"), str):
        return data["image"]
    for value in data.values():
        if isinstance(value, str) and (value.startswith("/data/") or IMAGE_EXTENSIONS.search(value)):
            return value
    return None


def _decode_brush(region: dict[str, Any]) -> np.ndarray | None:
    value = region.get("value", {})
    if value.get("format") != "rle" or not value.get("rle"):
        return None
    return rle_to_mask(value["rle"], int(region["original_height"]), int(region["original_width"]))


def classify_annotation(result: list[dict[str, Any]]) -> tuple[str, np.ndarray | None, int]:
    """``(verdict, mask, n_regions)`` of one annotation's result list.

    Anomalous when a choice says so (anything but a normal word) or any defect region is drawn;
    normal when the choice is normal or, without a choice, when no region is drawn.
    """
    mask: np.ndarray | None = None
    regions = 0
    choices: list[str] = []
    for item in result:
        kind = item.get("type", "")
        if kind == "choices":
            choices += [str(c) for c in item.get("value", {}).get("choices", [])]
        elif kind in REGION_TYPES:
            regions += 1
            if kind == "brushlabels":
                decoded = _decode_brush(item)
                if decoded is not None:
                    mask = decoded if mask is None or mask.shape != decoded.shape else (mask | decoded)
    if choices:
        verdict = "normal" if all(is_normal_choice(c) for c in choices) and not regions else "anomalous"
    else:
        verdict = "anomalous" if regions else "normal"
    return verdict, mask, regions


def latest_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    """The most recent non-cancelled annotation of a task."""
    annotations = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
    if not annotations:
        return None
    return max(
        annotations, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id", 0))
    )


def labeled_images(tasks: list[dict[str, Any]]) -> list[LabeledImage]:
    """Annotated tasks with an image, reduced to verdict and mask."""
    found = []
    for task in tasks:
        annotation = latest_annotation(task)
        url = image_url(task)
        if annotation is None or url is None:
            continue
        verdict, mask, regions = classify_annotation(annotation.get("result", []))
        found.append(LabeledImage(int(task["id"]), url, verdict, mask, regions))
    return found

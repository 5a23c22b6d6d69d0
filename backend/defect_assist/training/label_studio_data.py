"""A project's annotations in Label Studio as a training set: normals, and anomalies with masks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defect_assist.core.settings import Settings
from defect_assist.label_studio.annotations import labeled_images
from defect_assist.label_studio.client import LabelStudioClient
from defect_assist.training.image_cache import ImageCache
from defect_assist.training.progress import TrainingProgress


@dataclass
class TrainingSet:
    """Normal images and labeled anomalies (with their masks, when drawn) to train and check on."""

    normals: list[Path] = field(default_factory=list)
    anomalies: list[tuple[Path, np.ndarray | None]] = field(default_factory=list)
    source: str = "label-studio"
    n_tasks: int = 0
    downloaded: int = 0


def collect_label_studio(project: str, settings: Settings, progress: TrainingProgress) -> TrainingSet:
    """Export the project's annotations and cache their images."""
    progress("fetch", 0, 1)
    with LabelStudioClient.from_settings(settings) as client:
        tasks = client.export_tasks(project)
        return _cache_images(tasks, Path(settings.cache_dir) / "images", client, progress)


def _cache_images(
    tasks: list[dict[str, Any]], cache_dir: Path, client: LabelStudioClient, progress: TrainingProgress
) -> TrainingSet:
    labeled = labeled_images(tasks)
    progress("fetch", 1, 1)
    cache = ImageCache(cache_dir)
    found = TrainingSet(n_tasks=len(tasks))
    seen: set[str] = set()
    for i, item in enumerate(labeled):
        path, downloaded = cache.fetch(item.url, client)
        found.downloaded += downloaded
        if path.name in seen:  # the same image in two tasks: keep it once
            continue
        seen.add(path.name)
        if item.verdict == "normal":
            found.normals.append(path)
        else:
            found.anomalies.append((path, item.mask))
        progress("download", i + 1, len(labeled))
    return found

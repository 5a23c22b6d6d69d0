"""A project's annotations in Label Studio as a training set: normals, and anomalies with masks.

Task images are read under the same source rule as serving (:mod:`defect_assist.label_studio.image_sources`,
docs/reliability.md): an image whose source is refused, that another allowed host fails to give, or that
Label Studio answers with a 4xx, is left out with a logged reason (``skipped``); Label Studio itself
unreachable or answering 5xx is :class:`LabelStudioUnavailable`, which the worker retries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defect_assist.core.settings import Settings
from defect_assist.label_studio.annotations import labeled_images
from defect_assist.label_studio.client import LabelStudioClient, LabelStudioUnavailable
from defect_assist.label_studio.image_sources import ImageFetchError, ImageRefused, ImageSources, describe
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
    skipped: list[str] = field(default_factory=list)  # "<reference>: <reason>" of images left out


logger = logging.getLogger(__name__)


def collect_label_studio(project: str, settings: Settings, progress: TrainingProgress) -> TrainingSet:
    """Export the project's annotations and cache their images."""
    progress("fetch", 0, 1)
    sources = ImageSources.from_settings(settings, settings.max_image_bytes)
    try:
        with LabelStudioClient.from_settings(settings) as client:
            tasks = client.export_tasks(project)
            cache_dir = Path(settings.cache_dir) / "images"
            return _cache_images(tasks, cache_dir, client, sources, progress, settings.image_fetch_timeout)
    finally:
        sources.close()


def _cache_images(
    tasks: list[dict[str, Any]],
    cache_dir: Path,
    client: LabelStudioClient,
    sources: ImageSources,
    progress: TrainingProgress,
    timeout: float,
) -> TrainingSet:
    labeled = labeled_images(tasks)
    progress("fetch", 1, 1)
    cache = ImageCache(cache_dir)
    found = TrainingSet(n_tasks=len(tasks))
    seen: set[str] = set()
    for i, item in enumerate(labeled):
        progress("download", i + 1, len(labeled))
        try:
            path, downloaded = cache.fetch(item.url, client, sources, timeout)
        except (ImageFetchError, ImageRefused) as error:
            failed = isinstance(error, ImageFetchError) and (error.status is None or error.status >= 500)
            if failed and sources.on_label_studio(item.url):
                raise LabelStudioUnavailable(f"cannot fetch image {describe(item.url)}: {error}") from error
            found.skipped.append(f"{describe(item.url)}: {error}")
            logger.warning("retrain: image %s left out: %s", describe(item.url), error)
            continue
        found.downloaded += downloaded
        if path.name in seen:  # the same image in two tasks: keep it once
            continue
        seen.add(path.name)
        if item.verdict == "normal":
            found.normals.append(path)
        else:
            found.anomalies.append((path, item.mask))
    return found

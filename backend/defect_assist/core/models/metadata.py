"""What a saved model records about itself: its kind, configuration, calibration and training set."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defect_assist.core.calibration import Calibration
from defect_assist.core.images import ImageSource

METADATA_FILE = "metadata.json"
WEIGHTS_FILE = "weights.pt"


@dataclass
class ModelMetadata:
    """Everything needed to reload, describe and audit a trained model."""

    kind: str
    backbone: str
    image_size: int
    resize: str
    config: dict[str, Any]
    calibration: dict[str, Any] = field(default_factory=dict)
    training_fingerprint: str = ""
    n_train_images: int = 0
    created: str = ""
    fit_seconds: float = 0.0
    update: str = "full"  # full | incremental
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def record_incremental(self, sources: Sequence[ImageSource], created: str) -> None:
        """Note normal images added without a refit: counts, time, the chained training fingerprint."""
        self.update = "incremental"
        self.n_train_images += len(sources)
        self.created = created
        chained = self.training_fingerprint + fingerprint_sources(sources)
        self.training_fingerprint = hashlib.sha256(chained.encode()).hexdigest()
        self.extra["incremental_images"] = self.extra.get("incremental_images", 0) + len(sources)


@dataclass
class FitReport:
    """What a fit did; also recorded in the metadata."""

    n_train: int
    n_holdout: int
    fit_seconds: float
    calibration: Calibration
    details: dict[str, Any] = field(default_factory=dict)


def fingerprint_sources(sources: Sequence[ImageSource]) -> str:
    """Order-independent SHA-256 over the images' bytes: the identity of a training set."""
    digests = []
    for source in sources:
        if isinstance(source, str | Path):
            data = Path(source).read_bytes()
        elif isinstance(source, bytes):
            data = source
        else:
            data = np.ascontiguousarray(source).tobytes()
        digests.append(hashlib.sha256(data).hexdigest())
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()

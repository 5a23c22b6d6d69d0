"""The one model interface every anomaly model implements (PatchCore, EfficientAd, …).

A model fits on normal images only, calibrates its thresholds on held-out normals, and predicts per
image: an anomaly score normalised so that 0.5 is the decision threshold, a verdict, an anomaly map
at the original image size and a binary defect mask. Models save to and load from a directory
(``metadata.json`` + ``weights.pt``), which the versioned store publishes atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from defect_assist import backbones
from defect_assist.images import ImageLoadError, ImageSource, collect_images, describe_source, load_image
from defect_assist.preprocessing import Placement, ResizeMode, fit_into_square, map_to_original, to_tensor
from defect_assist.settings import resolve_device

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
WEIGHTS_FILE = "weights.pt"
ProgressCallback = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class Prediction:
    """Result for one image. ``error`` is set (and the rest empty) when the image could not be read."""

    source: str
    score: float = math.nan  # normalised: 0.5 = threshold, monotone in the raw score
    raw_score: float = math.nan
    is_anomalous: bool = False
    anomaly_map: np.ndarray | None = None  # HxW float32, normalised like the score (0.5 = pixel threshold)
    mask: np.ndarray | None = None  # HxW bool, anomaly_map > 0.5
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def label(self) -> str:
        return "anomalous" if self.is_anomalous else "normal"

    def summary(self) -> dict[str, Any]:
        """JSON-friendly fields (no arrays)."""
        out: dict[str, Any] = {"source": self.source, "error": self.error}
        if self.ok:
            out |= {
                "score": round(self.score, 6),
                "raw_score": round(self.raw_score, 6),
                "label": self.label,
                "defect_pixels": int(self.mask.sum()) if self.mask is not None else 0,
            }
        return out


@dataclass
class Calibration:
    """Thresholds and the logistic normalisation ``sigmoid((raw - threshold) / scale)``.

    Rule (normal-only data): the image threshold is the ``image_quantile`` quantile of raw scores of
    held-out normal images; the pixel threshold is the ``pixel_quantile`` quantile of their anomaly-map
    values. Scales are the distance from the median to the threshold divided by 3, so a median
    normal maps to sigmoid(-3) ≈ 0.05.
    """

    image_threshold: float = 0.0
    image_scale: float = 1.0
    pixel_threshold: float = 0.0
    pixel_scale: float = 1.0
    image_quantile: float = 0.99
    pixel_quantile: float = 0.999
    n_images: int = 0
    source: str = "held-out normals"

    @staticmethod
    def _scale(median: float, threshold: float) -> float:
        return max((threshold - median) / 3.0, 1e-6)

    @classmethod
    def from_normals(
        cls,
        scores: np.ndarray,
        maps: np.ndarray,
        image_quantile: float = 0.99,
        pixel_quantile: float = 0.999,
        source: str = "held-out normals",
    ) -> Calibration:
        image_threshold = float(np.quantile(scores, image_quantile))
        flat = (
            maps.reshape(-1)
            if maps.size <= 20_000_000
            else np.random.default_rng(0).choice(maps.reshape(-1), 20_000_000)
        )
        pixel_threshold = float(np.quantile(flat, pixel_quantile))
        return cls(
            image_threshold=image_threshold,
            image_scale=cls._scale(float(np.median(scores)), image_threshold),
            pixel_threshold=pixel_threshold,
            pixel_scale=cls._scale(float(np.median(flat)), pixel_threshold),
            image_quantile=image_quantile,
            pixel_quantile=pixel_quantile,
            n_images=len(scores),
            source=source,
        )

    def normalise_score(self, raw: np.ndarray | float) -> np.ndarray:
        return 1.0 / (
            1.0
            + np.exp(
                -np.clip((np.asarray(raw, np.float64) - self.image_threshold) / self.image_scale, -60, 60)
            )
        )

    def normalise_map(self, raw: np.ndarray) -> np.ndarray:
        z = np.clip((raw.astype(np.float32) - self.pixel_threshold) / self.pixel_scale, -60, 60)
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)

    def raw_score_threshold_for(self, normalised: float) -> float:
        """Raw score corresponding to a normalised score (inverse of the logistic map)."""
        return self.image_threshold + self.image_scale * math.log(normalised / (1.0 - normalised))


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


def _as_sources(images: Sequence[ImageSource] | str | Path) -> list[ImageSource]:
    if isinstance(images, str | Path):
        found = collect_images([images])
        if not found:
            raise FileNotFoundError(f"no images found in {images}")
        return list(found)
    return list(images)


@dataclass
class LoadedBatch:
    """Images of a batch that decoded, their placements, and the errors of those that did not."""

    indices: list[int]
    tensor: torch.Tensor | None
    placements: list[Placement]
    errors: dict[int, str]

    def valid_mask(self, size: int, device: torch.device) -> torch.Tensor:
        """``B x S x S`` bool: True where the pixel belongs to the image, False on padding."""
        mask = torch.zeros(len(self.placements), size, size, dtype=torch.bool, device=device)
        for i, p in enumerate(self.placements):
            mask[i, p.top : p.top + p.height, p.left : p.left + p.width] = True
        return mask


class AnomalyModel(ABC):
    """Base class: preprocessing, batching, calibration, normalisation and persistence."""

    kind: ClassVar[str] = ""
    default_config: ClassVar[dict[str, Any]] = {}
    # Options added after models were first saved: the value such an older model was trained with.
    saved_model_defaults: ClassVar[dict[str, Any]] = {}
    supports_incremental: ClassVar[bool] = False

    def __init__(self, device: str = "auto", **config: Any) -> None:
        unknown = set(config) - set(self.default_config)
        if unknown:
            raise TypeError(f"{self.kind}: unknown options {sorted(unknown)}")
        self.config: dict[str, Any] = {**self.default_config, **config}
        self.device = torch.device(resolve_device(device))
        self.calibration: Calibration | None = None
        self.metadata: ModelMetadata | None = None
        self.mean, self.std = backbones.normalisation(self.config["backbone"])

    # ----------------------------------------------------------------- to implement per model
    @abstractmethod
    def _fit(
        self, batches: Callable[[], Iterator[torch.Tensor]], n_images: int, progress: ProgressCallback
    ) -> dict[str, Any]:
        """Train on normal images; ``batches()`` yields fresh normalised tensors each call."""

    @abstractmethod
    def _infer(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw image scores ``(B,)`` and anomaly maps ``(B, S, S)`` at model resolution."""

    @abstractmethod
    def _state(self) -> dict[str, Any]:
        """Tensors and values to save (``torch.save``-able)."""

    @abstractmethod
    def _load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_state` returned."""

    def _infer_valid(self, tensor: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`_infer`, told which pixels are image (``True``) and which are letterbox padding."""
        return self._infer(tensor)

    def _extend(
        self, batches: Callable[[], Iterator[torch.Tensor]], n_images: int, progress: ProgressCallback
    ) -> dict[str, Any]:
        """Add normal images to a trained model without refitting (models with a memory bank)."""
        raise NotImplementedError(f"{self.kind} does not support incremental updates")

    def embed(self, tensor: torch.Tensor, anomaly_weighted: bool = False) -> torch.Tensor:
        """Image embeddings ``(B, D)`` for similarity search (pooled backbone features)."""
        raise NotImplementedError(f"{self.kind} does not provide embeddings")

    # ----------------------------------------------------------------- preprocessing
    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def resize_mode(self) -> ResizeMode:
        return self.config.get("resize", "letterbox")

    def load_batch(self, sources: Sequence[ImageSource], offset: int = 0) -> LoadedBatch:
        """Decode and preprocess a batch; unreadable images are reported, not raised."""
        arrays, placements, indices, errors = [], [], [], {}
        for i, source in enumerate(sources):
            try:
                image = load_image(source)
            except ImageLoadError as error:
                errors[offset + i] = str(error)
                logger.warning("%s", error)
                continue
            resized, placement = fit_into_square(image, self.image_size, self.resize_mode)
            arrays.append(resized)
            placements.append(placement)
            indices.append(offset + i)
        tensor = to_tensor(arrays, self.mean, self.std) if arrays else None
        return LoadedBatch(indices, tensor, placements, errors)

    def _batch_factory(
        self, sources: Sequence[ImageSource], batch_size: int, strict: bool = True
    ) -> Callable[[], Iterator[torch.Tensor]]:
        def batches() -> Iterator[torch.Tensor]:
            for start in range(0, len(sources), batch_size):
                loaded = self.load_batch(sources[start : start + batch_size], start)
                if loaded.errors and strict:
                    raise ImageLoadError(*next(iter(loaded.errors.values())).split(": ", 1))
                if loaded.tensor is not None:
                    yield loaded.tensor.to(self.device)

        return batches

    # ----------------------------------------------------------------- fitting
    def fit(
        self,
        images: Sequence[ImageSource] | str | Path,
        holdout_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 16,
        progress: ProgressCallback | None = None,
    ) -> FitReport:
        """Fit on normal images, calibrate on a held-out share of them, then (if possible) absorb it.

        Unreadable training images are skipped with a warning. With fewer than 10 images nothing is
        held out and the thresholds come from the training images themselves (optimistic).
        """
        progress = progress or (lambda stage, done, total: None)
        sources = self._readable(_as_sources(images))
        if not sources:
            raise ValueError("no readable training images")
        start = time.perf_counter()
        order = list(range(len(sources)))
        random.Random(seed).shuffle(order)
        n_holdout = 0 if len(sources) < 10 else max(5, min(200, round(len(sources) * holdout_fraction)))
        holdout = [sources[i] for i in order[:n_holdout]]
        train = [sources[i] for i in order[n_holdout:]]
        torch.manual_seed(seed)
        details = self._fit(self._batch_factory(train, batch_size), len(train), progress)
        calibration_set = holdout or train
        scores, maps = self._raw_outputs(calibration_set, batch_size, progress, stage="calibrate")
        self.calibration = Calibration.from_normals(
            scores, maps, source="held-out normals" if holdout else "training normals (fewer than 10 images)"
        )
        if holdout and self.supports_incremental:
            details |= {
                "holdout_absorbed": True,
                **self._extend(self._batch_factory(holdout, batch_size), len(holdout), progress),
            }
        fit_seconds = time.perf_counter() - start
        self.metadata = ModelMetadata(
            kind=self.kind,
            backbone=self.config["backbone"],
            image_size=self.image_size,
            resize=self.resize_mode,
            config=dict(self.config),
            calibration=asdict(self.calibration),
            training_fingerprint=fingerprint_sources(sources),
            n_train_images=len(sources),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            fit_seconds=round(fit_seconds, 3),
            extra={"n_holdout": n_holdout, "device": str(self.device), **details},
        )
        return FitReport(len(train), n_holdout, fit_seconds, self.calibration, details)

    def update(
        self,
        images: Sequence[ImageSource] | str | Path,
        batch_size: int = 16,
        progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Incrementally add new normal images (thresholds kept); raises if the model can't."""
        if not self.supports_incremental:
            raise NotImplementedError(f"{self.kind} does not support incremental updates")
        sources = self._readable(_as_sources(images))
        details = self._extend(
            self._batch_factory(sources, batch_size), len(sources), progress or (lambda *a: None)
        )
        assert self.metadata is not None
        self.metadata.update = "incremental"
        self.metadata.n_train_images += len(sources)
        self.metadata.created = datetime.now(UTC).isoformat(timespec="seconds")
        self.metadata.training_fingerprint = hashlib.sha256(
            (self.metadata.training_fingerprint + fingerprint_sources(sources)).encode()
        ).hexdigest()
        self.metadata.extra["incremental_images"] = self.metadata.extra.get("incremental_images", 0) + len(
            sources
        )
        return details

    @staticmethod
    def _readable(sources: list[ImageSource]) -> list[ImageSource]:
        readable = []
        for source in sources:
            try:
                load_image(source)
            except ImageLoadError as error:
                logger.warning("skipping training image: %s", error)
                continue
            readable.append(source)
        return readable

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def _raw_outputs(
        self,
        sources: Sequence[ImageSource],
        batch_size: int,
        progress: ProgressCallback,
        stage: str = "predict",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw scores and valid-region maps (padding excluded, flattened per image) of readable images."""
        scores, maps = [], []
        for start in range(0, len(sources), batch_size):
            loaded = self.load_batch(sources[start : start + batch_size], start)
            if loaded.tensor is None:
                continue
            batch_scores, batch_maps = self._infer_valid(
                loaded.tensor.to(self.device), loaded.valid_mask(self.image_size, self.device)
            )
            batch_maps_np = batch_maps.float().cpu().numpy()
            scores.extend(batch_scores.float().cpu().numpy().tolist())
            for j, placement in enumerate(loaded.placements):
                region = batch_maps_np[
                    j,
                    placement.top : placement.top + placement.height,
                    placement.left : placement.left + placement.width,
                ]
                maps.append(region[::2, ::2].reshape(-1))
            progress(stage, min(start + batch_size, len(sources)), len(sources))
        return np.asarray(scores, dtype=np.float64), np.concatenate(maps) if maps else np.zeros(0, np.float32)

    @torch.no_grad()
    def predict(
        self,
        images: Sequence[ImageSource] | str | Path,
        batch_size: int = 8,
        progress: ProgressCallback | None = None,
    ) -> list[Prediction]:
        """Predict every image; an unreadable one gets a :class:`Prediction` with ``error`` set."""
        if self.calibration is None:
            raise RuntimeError("model is not fitted")
        sources = _as_sources(images)
        results: list[Prediction] = [Prediction(source=describe_source(s)) for s in sources]
        for start in range(0, len(sources), batch_size):
            loaded = self.load_batch(sources[start : start + batch_size], start)
            for index, message in loaded.errors.items():
                results[index].error = message
            if loaded.tensor is None:
                continue
            raw_scores, raw_maps = self._infer_valid(
                loaded.tensor.to(self.device), loaded.valid_mask(self.image_size, self.device)
            )
            raw_scores_np = raw_scores.float().cpu().numpy()
            raw_maps_np = raw_maps.float().cpu().numpy()
            for j, index in enumerate(loaded.indices):
                anomaly_map = self.calibration.normalise_map(
                    map_to_original(raw_maps_np[j], loaded.placements[j])
                )
                score = float(self.calibration.normalise_score(raw_scores_np[j]))
                result = results[index]
                result.raw_score = float(raw_scores_np[j])
                result.score = score
                result.is_anomalous = score >= 0.5
                result.anomaly_map = anomaly_map
                result.mask = anomaly_map > 0.5
            if progress:
                progress("predict", min(start + batch_size, len(sources)), len(sources))
        return results

    def predict_one(self, image: ImageSource) -> Prediction:
        return self.predict([image], batch_size=1)[0]

    @torch.no_grad()
    def embed_images(
        self, images: Sequence[ImageSource], batch_size: int = 8, anomaly_weighted: bool = False
    ) -> tuple[np.ndarray, list[str | None]]:
        """Embeddings ``(N, D)`` of readable images (unreadable ones: NaN rows) and per-image errors."""
        sources = _as_sources(images)
        rows: list[np.ndarray | None] = [None] * len(sources)
        errors: list[str | None] = [None] * len(sources)
        for start in range(0, len(sources), batch_size):
            loaded = self.load_batch(sources[start : start + batch_size], start)
            for index, message in loaded.errors.items():
                errors[index] = message
            if loaded.tensor is None:
                continue
            vectors = (
                self.embed(loaded.tensor.to(self.device), anomaly_weighted=anomaly_weighted)
                .float()
                .cpu()
                .numpy()
            )
            for j, index in enumerate(loaded.indices):
                rows[index] = vectors[j]
        dim = next((r.shape[0] for r in rows if r is not None), 0)
        matrix = (
            np.stack([r if r is not None else np.full(dim, np.nan, np.float32) for r in rows])
            if rows
            else np.zeros((0, 0))
        )
        return matrix.astype(np.float32), errors

    # ----------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> None:
        """Write ``metadata.json`` and ``weights.pt`` into ``directory`` (created if needed)."""
        if self.metadata is None or self.calibration is None:
            raise RuntimeError("cannot save an unfitted model")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.metadata.calibration = asdict(self.calibration)
        torch.save(
            {"kind": self.kind, "config": self.config, "state": self._state()}, directory / WEIGHTS_FILE
        )
        (directory / METADATA_FILE).write_text(json.dumps(asdict(self.metadata), indent=2, default=str))

    @classmethod
    def from_directory(cls, directory: str | Path, device: str = "auto") -> AnomalyModel:
        directory = Path(directory)
        metadata = ModelMetadata(**json.loads((directory / METADATA_FILE).read_text()))
        payload = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=False)
        model = cls(device=device, **{**cls.saved_model_defaults, **payload["config"]})
        model._load_state(payload["state"])
        model.metadata = metadata
        model.calibration = Calibration(**metadata.calibration)
        return model

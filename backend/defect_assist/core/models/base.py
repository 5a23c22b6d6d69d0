"""The one model interface every anomaly model implements (PatchCore, EfficientAd, …).

A model fits on normal images only, calibrates its thresholds on held-out normals, and predicts per
image: an anomaly score normalised so that 0.5 is the decision threshold, a verdict, an anomaly map
at the original image size and a binary defect mask (:mod:`~defect_assist.core.mask_rule`, or a
defect head learned from corrected masks: :mod:`~defect_assist.core.refinement`). Its options are
a typed config dataclass (:class:`ModelConfig` subclass) stored in its metadata. Models save to and
load from a directory (``metadata.json`` + ``weights.pt``), which the versioned store publishes
atomically.
"""

from __future__ import annotations

import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from defect_assist.core import backbones
from defect_assist.core.calibration import Calibration
from defect_assist.core.images import ImageLoadError, ImageSource, describe_source, load_image
from defect_assist.core.mask_rule import MaskRule
from defect_assist.core.models.batches import LoadedBatch, as_sources, readable
from defect_assist.core.models.config import ModelConfig
from defect_assist.core.models.metadata import FitReport, ModelMetadata, fingerprint_sources
from defect_assist.core.models.persistence import load_saved_model, save_model
from defect_assist.core.models.prediction import Embedding, ImageEmbeddings, Prediction, stack_rows
from defect_assist.core.preprocessing import (
    Placement,
    ResizeMode,
    fit_into_square,
    map_to_original,
    to_tensor,
)
from defect_assist.core.progress import ProgressCallback
from defect_assist.core.refinement import CutMemory, DefectHead, defect_descriptors, learn_from_corrections
from defect_assist.core.settings import resolve_device

logger = logging.getLogger(__name__)


class AnomalyModel(ABC):
    """Base class: preprocessing, batching, calibration, normalisation and persistence."""

    kind: ClassVar[str] = ""
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    # Options added after models were first saved: the value such an older model was trained with.
    saved_model_defaults: ClassVar[dict[str, Any]] = {}
    supports_incremental: ClassVar[bool] = False
    supports_corrections: ClassVar[bool] = False  # implements _infer_with_patch_inputs

    def __init__(self, device: str = "auto", **options: Any) -> None:
        try:
            self.config = self.config_class.from_options(options)
        except TypeError as error:
            raise TypeError(f"{self.kind}: {error}") from None
        self.device = torch.device(resolve_device(device))
        self.calibration: Calibration | None = None
        self.metadata: ModelMetadata | None = None
        self.defect_head: DefectHead | None = None  # learned from corrected masks (core.refinement)
        self.cut_memory: CutMemory | None = None  # the same, as the cut of the nearest corrected defect
        self.runtime: Any = None  # an ExportedRuntime predicting in place of torch (core.export)
        self.mean, self.std = backbones.normalisation(self.config.backbone)

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

    def _infer_with_mask_maps(
        self, tensor: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_infer_valid` plus the maps the served mask is cut from ``(B, S, S)``.

        By default the anomaly maps themselves; a model whose anomaly map is smoothed for ranking
        (PatchCore's σ) returns a less smoothed map here, so masks keep the defects' shape.
        """
        scores, maps = self._infer_valid(tensor, valid)
        return scores, maps, maps

    def _infer_with_patch_inputs(
        self, tensor: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_infer_with_mask_maps` plus per-patch inputs ``(B, C, h, w)`` for learning from
        corrections (features, then the patch score and the score / image peak as the last two)."""
        raise NotImplementedError(f"{self.kind} does not learn from corrected masks")

    def _served_outputs(
        self, tensor: torch.Tensor, valid: torch.Tensor, embed: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[MaskRule | None], Embedding | None]:
        """Raw scores, anomaly maps, mask maps and each image's mask rule for one batch, as served;
        with ``embed`` also the similarity :class:`Embedding`, from the same forward pass where the
        model can (models with patch inputs)."""
        assert self.calibration is not None
        rule, embedding = self.calibration.mask_rule(), None
        if self.supports_corrections and (self.defect_head or self.cut_memory or embed):
            scores, maps, mask_maps, inputs = self._infer_with_patch_inputs(tensor, valid)
            rules = [rule]
            if self.defect_head is not None:
                probabilities = self.defect_head.probabilities(inputs)
                mask_maps = DefectHead.upsampled(probabilities, self.image_size)
                rules = [self.defect_head.rule]
            elif self.cut_memory is not None and rule is not None:
                relatives = self.cut_memory.relatives_for(defect_descriptors(inputs, valid))
                rules = [replace(rule, relative=relative) for relative in relatives]
            if embed:
                embedding = self._embed_patch_inputs(inputs)
        else:
            scores, maps, mask_maps = self._infer_with_mask_maps(tensor, valid)
            rules = [rule]
            if embed:
                embedding = self.embed(tensor)
        rules = rules * len(scores) if len(rules) == 1 else rules
        arrays = (t.float().cpu().numpy() for t in (scores, maps, mask_maps))
        return *arrays, rules, embedding  # type: ignore[return-value]

    def _embed_patch_inputs(self, inputs: torch.Tensor) -> Embedding:
        """:meth:`embed` from :meth:`_infer_with_patch_inputs`'s output (no second forward pass)."""
        raise NotImplementedError(f"{self.kind} embeds from the image only")

    def learn_from_corrections(
        self, defects: Sequence[tuple[ImageSource, np.ndarray]], normals: Sequence[ImageSource]
    ) -> dict[str, Any]:
        """Train the defect head on corrected defect images (with their masks) and normal images."""
        if not self.supports_corrections:
            raise NotImplementedError(f"{self.kind} does not learn from corrected masks")
        learned = learn_from_corrections(self, list(defects), list(normals))
        self.defect_head, self.cut_memory = learned.head, learned.cuts
        if learned.relative is not None and self.calibration is not None:
            self.calibration.mask_relative = learned.relative
        info = {**learned.info(), "n_corrected": len(defects), "n_normal_images": len(normals)}
        if self.metadata is not None:
            self.metadata.extra["defect_head"] = info
        return info

    def _extend(
        self, batches: Callable[[], Iterator[torch.Tensor]], n_images: int, progress: ProgressCallback
    ) -> dict[str, Any]:
        """Add normal images to a trained model without refitting (models with a memory bank)."""
        raise NotImplementedError(f"{self.kind} does not support incremental updates")

    def embed(self, tensor: torch.Tensor) -> Embedding:
        """Image embeddings for similarity search: the features pooled overall and over the defect."""
        raise NotImplementedError(f"{self.kind} does not provide embeddings")

    def serving_graph(self) -> torch.nn.Module:
        """The served forward as one traceable module, for export (:mod:`defect_assist.core.export`)."""
        raise NotImplementedError(f"{self.kind} has no exportable serving graph yet")

    # ----------------------------------------------------------------- preprocessing
    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def resize_mode(self) -> ResizeMode:
        return self.config.resize  # type: ignore[return-value]

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
        sources = readable(as_sources(images))
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
        scores, maps, mask_maps = self._raw_outputs(calibration_set, batch_size, progress, stage="calibrate")
        self.calibration = Calibration.from_normals(
            scores,
            maps,
            image_quantile=self.config.image_quantile,
            pixel_quantile=self.config.pixel_quantile,
            source="held-out normals" if holdout else "training normals (fewer than 10 images)",
            mask_maps=mask_maps,
            mask_quantile=self.config.mask_quantile,
            mask_relative=self.config.mask_relative,
        )
        if holdout and self.supports_incremental:
            details |= {
                "holdout_absorbed": True,
                **self._extend(self._batch_factory(holdout, batch_size), len(holdout), progress),
            }
        fit_seconds = time.perf_counter() - start
        self.metadata = ModelMetadata(
            kind=self.kind,
            backbone=self.config.backbone,
            image_size=self.image_size,
            resize=self.resize_mode,
            config=self.config.to_dict(),
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
        sources = readable(as_sources(images))
        details = self._extend(
            self._batch_factory(sources, batch_size), len(sources), progress or (lambda *a: None)
        )
        assert self.metadata is not None
        self.metadata.record_incremental(sources, datetime.now(UTC).isoformat(timespec="seconds"))
        self.runtime = None  # an export holds the bank before this update
        return details

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def _raw_outputs(
        self,
        sources: Sequence[ImageSource],
        batch_size: int,
        progress: ProgressCallback,
        stage: str = "predict",
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw scores, anomaly maps and mask maps of readable images (image area only, flattened)."""
        scores, maps, mask_maps = [], [], []
        for start in range(0, len(sources), batch_size):
            loaded = self.load_batch(sources[start : start + batch_size], start)
            if loaded.tensor is None:
                continue
            batch_scores, batch_maps, batch_mask_maps = self._infer_with_mask_maps(
                loaded.tensor.to(self.device), loaded.valid_mask(self.image_size, self.device)
            )
            scores.extend(batch_scores.float().cpu().numpy().tolist())
            for target, values in ((maps, batch_maps), (mask_maps, batch_mask_maps)):
                array = values.float().cpu().numpy()
                for j, p in enumerate(loaded.placements):
                    region = array[j, p.top : p.top + p.height, p.left : p.left + p.width]
                    target.append(region[::2, ::2].reshape(-1))
            progress(stage, min(start + batch_size, len(sources)), len(sources))
        empty = np.zeros(0, np.float32)
        return (
            np.asarray(scores, dtype=np.float64),
            np.concatenate(maps) if maps else empty,
            np.concatenate(mask_maps) if mask_maps else empty,
        )

    @torch.no_grad()
    def predict(
        self,
        images: Sequence[ImageSource] | str | Path,
        batch_size: int = 8,
        progress: ProgressCallback | None = None,
    ) -> list[Prediction]:
        """Predict every image; an unreadable one gets a :class:`Prediction` with ``error`` set."""
        return self._predict(as_sources(images), batch_size, progress, embed=False)[0]

    @torch.no_grad()
    def predict_and_embed(
        self, images: Sequence[ImageSource], batch_size: int = 8
    ) -> tuple[list[Prediction], ImageEmbeddings]:
        """:meth:`predict` and :meth:`embed_images` in one pass: each image decoded once and, for
        models with patch inputs (PatchCore), one backbone forward for the score and the embedding."""
        return self._predict(as_sources(images), batch_size, None, embed=True)  # type: ignore[return-value]

    def _predict(
        self, sources: Sequence[ImageSource], batch_size: int, progress: ProgressCallback | None, embed: bool
    ) -> tuple[list[Prediction], ImageEmbeddings | None]:
        if self.calibration is None:
            raise RuntimeError("model is not fitted")
        results: list[Prediction] = [Prediction(source=describe_source(s)) for s in sources]
        pooled: list[np.ndarray | None] = [None] * len(sources)
        defect: list[np.ndarray | None] = [None] * len(sources)
        for start in range(0, len(sources), batch_size):
            loaded = self.load_batch(sources[start : start + batch_size], start)
            for index, message in loaded.errors.items():
                results[index].error = message
            if loaded.tensor is None:
                continue
            raw_scores_np, raw_maps_np, mask_maps_np, rules, embedding = self._served_outputs(
                loaded.tensor.to(self.device), loaded.valid_mask(self.image_size, self.device), embed
            )
            for j, index in enumerate(loaded.indices):
                self._fill(results[index], loaded.placements[j], raw_scores_np[j], raw_maps_np[j])
                result, rule = results[index], rules[j]
                mask_map = map_to_original(mask_maps_np[j], loaded.placements[j])
                result.mask = rule.apply(mask_map, result.is_anomalous) if rule else result.anomaly_map > 0.5
                if embedding is not None:
                    pooled[index] = embedding.pooled[j].float().cpu().numpy()
                    defect[index] = embedding.defect[j].float().cpu().numpy()
            if progress:
                progress("predict", min(start + batch_size, len(sources)), len(sources))
        if not embed:
            return results, None
        return results, ImageEmbeddings(stack_rows(pooled), stack_rows(defect), [r.error for r in results])

    def _fill(self, result: Prediction, placement: Placement, raw_score: float, raw_map: np.ndarray) -> None:
        """Score, verdict and anomaly map of one prediction (its mask is cut by the caller)."""
        assert self.calibration is not None
        result.raw_score = float(raw_score)
        result.score = float(self.calibration.normalise_score(raw_score))
        result.is_anomalous = result.score >= 0.5
        result.anomaly_map = self.calibration.normalise_map(map_to_original(raw_map, placement))

    def predict_one(self, image: ImageSource) -> Prediction:
        return self.predict([image], batch_size=1)[0]

    def embed_images(self, images: Sequence[ImageSource], batch_size: int = 8) -> ImageEmbeddings:
        """The similarity embeddings of every image (:meth:`predict_and_embed` without its predictions)."""
        return self.predict_and_embed(images, batch_size)[1]

    # ----------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> None:
        """Write ``metadata.json`` and ``weights.pt`` into ``directory`` (created if needed)."""
        save_model(self, Path(directory))

    @classmethod
    def from_directory(cls, directory: str | Path, device: str = "auto") -> AnomalyModel:
        return load_saved_model(cls, Path(directory), device)

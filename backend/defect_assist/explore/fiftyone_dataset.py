"""Build a FiftyOne dataset of a folder with the model's predictions, heatmaps and embeddings.

Per sample (fields):

* ``ground_truth`` — ``fo.Classification`` (normal / anomalous) when the folder layout tells it,
  ``defect_type``, ``split`` (also as sample tags) and ``gt_mask`` — ``fo.Segmentation`` of the
  ground-truth mask (MVTec ``ground_truth/<type>/<stem>_mask.png``, defect where the value is > 0);
* ``prediction`` — ``fo.Classification`` (verdict, ``confidence`` = normalised score) and ``score``;
* ``anomaly_map`` — ``fo.Heatmap`` (8-bit PNG of the normalised map, range 0–255, 128 = threshold);
* ``pred_mask`` — ``fo.Segmentation`` (anomaly map > 0.5);
* ``model_version``, ``embedding`` (the similarity vector, see ``defect_assist.similarity.embedding``).

Dataset-level brain runs: ``embeddings_viz`` — a 2-D visualisation (UMAP when ``umap-learn`` is
installed, else PCA) and ``similarity`` — a Qdrant similarity index (``qdrant_local`` backend,
:mod:`defect_assist.explore.qdrant_backend`) so the App's "sort by similarity" works offline.
Heatmap and mask PNGs are written next to the dataset under ``CACHE_DIR/fiftyone/<dataset>/``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fiftyone as fo
import fiftyone.brain as fob
import numpy as np
from PIL import Image

from defect_assist.core.models.base import AnomalyModel
from defect_assist.core.models.prediction import Prediction
from defect_assist.core.progress import ProgressCallback
from defect_assist.explore.qdrant_backend import BACKEND_NAME, register_backend
from defect_assist.similarity.embedding import EMBEDDING_NAME, SimilarityEmbedder
from defect_assist.similarity.mvtec import ImageRecord, walk_folder

logger = logging.getLogger(__name__)

SIMILARITY_KEY = "similarity"
VISUALIZATION_KEY = "embeddings_viz"
MASK_TARGETS = {1: "defect"}


def visualization_method() -> str:
    """``umap`` when umap-learn is importable, else ``pca``."""
    return "umap" if importlib.util.find_spec("umap") is not None else "pca"


def _write_png(array: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def _media_dir(dataset_name: str, media_dir: Path | None) -> Path:
    if media_dir is not None:
        return Path(media_dir)
    from defect_assist.core.settings import get_settings

    return get_settings().cache_dir / "fiftyone" / dataset_name


def prediction_fields(
    prediction: Prediction, stem: str, media_dir: Path, model_version: str
) -> dict[str, Any]:
    """The prediction labels of one image (heatmap and mask written as PNGs under ``media_dir``)."""
    if not prediction.ok:
        return {"prediction_error": prediction.error}
    assert prediction.anomaly_map is not None and prediction.mask is not None
    heat = np.clip(prediction.anomaly_map * 255.0, 0, 255).round().astype(np.uint8)
    return {
        "prediction": fo.Classification(label=prediction.label, confidence=float(prediction.score)),
        "score": float(prediction.score),
        "anomaly_map": fo.Heatmap(
            map_path=_write_png(heat, media_dir / f"{stem}_{model_version}_heatmap.png"), range=[0, 255]
        ),
        "pred_mask": fo.Segmentation(
            mask_path=_write_png(
                prediction.mask.astype(np.uint8), media_dir / f"{stem}_{model_version}_mask.png"
            )
        ),
        "model_version": model_version,
        "prediction_error": None,
    }


def _ground_truth_fields(record: ImageRecord, media_dir: Path) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "split": record.split,
        "defect_type": record.defect_type,
        "category": record.category,
    }
    if record.label:
        fields["ground_truth"] = fo.Classification(label=record.label)
    if record.mask_path is not None:
        with Image.open(record.mask_path) as mask:
            binary = (np.asarray(mask.convert("L")) > 0).astype(np.uint8)
        fields["gt_mask"] = fo.Segmentation(
            mask_path=_write_png(binary, media_dir / f"{_stem(record)}_gt.png")
        )
    return fields


def _stem(record: ImageRecord) -> str:
    parts = [p for p in (record.category, record.split, record.defect_type) if p]
    return "_".join([*parts, record.path.stem])


def add_predictions(
    samples: fo.core.collections.SampleCollection,
    embedder: SimilarityEmbedder,
    media_dir: Path,
    batch_size: int = 16,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """(Re)compute predictions and embeddings of ``samples`` in place; returns the ``(N, D)`` vectors."""
    ids, paths = samples.values("id"), samples.values("filepath")
    vectors: list[np.ndarray] = []
    dataset = samples._dataset
    for start in range(0, len(ids), batch_size):
        chunk_paths = paths[start : start + batch_size]
        result = embedder.embed(chunk_paths, keep_predictions=True)
        for j, sample_id in enumerate(ids[start : start + batch_size]):
            sample = dataset[sample_id]
            stem = Path(chunk_paths[j]).stem + "_" + sample_id[-8:]
            for key, value in prediction_fields(
                result.predictions[j], stem, media_dir, embedder.model_version
            ).items():
                sample[key] = value
            vector = result.vectors[j]
            sample["embedding"] = None if np.isnan(vector).any() else vector
            sample.save()
            vectors.append(vector)
        if progress:
            progress("predict", min(start + batch_size, len(ids)), len(ids))
    return np.stack(vectors) if vectors else np.zeros((0, 0), np.float32)


def compute_brain_runs(
    dataset: fo.Dataset, qdrant_path: Path | None = None, qdrant_url: str | None = None
) -> dict[str, Any]:
    """2-D visualisation and Qdrant similarity index from the ``embedding`` field (replacing old runs)."""
    register_backend()
    view = dataset.exists("embedding")
    for key in (VISUALIZATION_KEY, SIMILARITY_KEY):
        if key in dataset.list_brain_runs():
            if key == SIMILARITY_KEY:
                try:
                    dataset.load_brain_results(key).cleanup()
                except Exception as error:  # a vanished collection must not block a rebuild
                    logger.warning("could not clean up similarity index: %s", error)
            dataset.delete_brain_run(key)
    method = visualization_method()
    fob.compute_visualization(
        view, embeddings="embedding", method=method, brain_key=VISUALIZATION_KEY, num_dims=2, verbose=False
    )
    options: dict[str, Any] = {"url": qdrant_url} if qdrant_url else {"path": str(qdrant_path)}
    fob.compute_similarity(
        view,
        embeddings="embedding",
        backend=BACKEND_NAME,
        brain_key=SIMILARITY_KEY,
        metric="cosine",
        **options,
    )
    return {"visualization": method, "similarity_backend": BACKEND_NAME, **options}


def build_dataset(
    data: str | Path | Sequence[ImageRecord],
    model: AnomalyModel,
    name: str,
    model_version: str = "",
    project: str = "default",
    qdrant_path: Path | None = None,
    qdrant_url: str | None = None,
    media_dir: Path | None = None,
    limit: int | None = None,
    persistent: bool = True,
    overwrite: bool = True,
    progress: ProgressCallback | None = None,
) -> fo.Dataset:
    """A FiftyOne dataset of ``data`` (a folder or records) with predictions, embeddings and brain runs."""
    records = list(data) if not isinstance(data, str | Path) else walk_folder(data)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"no images in {data}")
    if fo.dataset_exists(name):
        if not overwrite:
            raise ValueError(f"dataset {name!r} exists")
        fo.delete_dataset(name)
    media = _media_dir(name, media_dir)
    if qdrant_path is None and not qdrant_url:
        from defect_assist.core.settings import get_settings

        qdrant_path = get_settings().qdrant_path / "fiftyone"
    dataset = fo.Dataset(name)
    dataset.persistent = persistent
    dataset.mask_targets = {"gt_mask": MASK_TARGETS, "pred_mask": MASK_TARGETS}
    for field_name, ftype in (
        ("split", fo.StringField),
        ("defect_type", fo.StringField),
        ("category", fo.StringField),
        ("score", fo.FloatField),
        ("model_version", fo.StringField),
        ("prediction_error", fo.StringField),
        ("ls_task_id", fo.IntField),
    ):
        dataset.add_sample_field(field_name, ftype)
    samples = []
    for record in records:
        sample = fo.Sample(filepath=str(Path(record.path).resolve()))
        for key, value in _ground_truth_fields(record, media).items():
            sample[key] = value
        if record.split:
            sample.tags.append(record.split)
        samples.append(sample)
    dataset.add_samples(samples, progress=False)
    embedder = SimilarityEmbedder(model, model_version)
    add_predictions(dataset, embedder, media, progress=progress)
    runs = compute_brain_runs(dataset, qdrant_path=qdrant_path, qdrant_url=qdrant_url)
    dataset.info = {
        "defect_assist": {
            "project": project,
            "model_version": model_version,
            "model_kind": model.kind,
            "embedding": EMBEDDING_NAME,
            "media_dir": str(media),
            "source": str(data) if isinstance(data, str | Path) else "",
            **runs,
        }
    }
    from fiftyone.core.odm.dataset import ActiveFields

    # show verdicts, heatmaps and masks on the grid by default
    shown = ["ground_truth", "prediction", "anomaly_map", "gt_mask"]
    dataset.app_config.active_fields = ActiveFields(paths=shown)
    dataset.app_config.color_scheme = fo.ColorScheme(
        color_by="value", default_mask_targets_colors=[{"intTarget": 1, "color": "#ff3030"}]
    )
    dataset.save()
    return dataset

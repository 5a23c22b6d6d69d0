"""Build a FiftyOne dataset of a folder with the model's predictions, heatmaps and embeddings.

Per sample (fields):

* ``ground_truth`` — ``fo.Classification`` (normal / anomalous) when the folder layout tells it,
  ``defect_type``, ``split`` (also as sample tags) and ``gt_mask`` — ``fo.Segmentation`` of the
  ground-truth mask (MVTec ``ground_truth/<type>/<stem>_mask.png``, defect where the value is > 0);
* ``prediction`` — ``fo.Classification`` (verdict, ``confidence`` = normalised score) and ``score``;
* ``anomaly_map`` — ``fo.Heatmap`` (8-bit PNG of the normalised map, range 0–255, 128 = threshold);
* ``pred_mask`` — ``fo.Segmentation`` of the served mask (``core.mask_rule``: only when anomalous);
* ``model_version``, ``content_hash`` (SHA-256 of the image bytes), ``embedding`` (the similarity
  vector, see ``defect_assist.similarity.embedding``).

Embeddings go through the project's one similarity index (:mod:`defect_assist.similarity.index`,
the collection ``defect-assist index`` / ``similar`` and the backend's ``/similar`` use): images it
already holds for this model version (same content hash) are not embedded again, only predicted (for
the heatmaps), and their ``embedding`` is the stored vector; new or stale ones are embedded once and
written to it. So ``defect-assist similar`` works right after ``defect-assist fiftyone`` and the
other way round, with no second pass.

Dataset-level brain runs: ``embeddings_viz`` — a 2-D visualisation (UMAP when ``umap-learn`` is
installed, else PCA) and ``similarity`` — the App's "sort by similarity", on that same project index
(``qdrant_local`` backend with ``hash_field="content_hash"``, :mod:`defect_assist.explore.qdrant_backend`),
offline. Heatmap and mask PNGs are written next to the dataset under ``CACHE_DIR/fiftyone/<dataset>/``.
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
from defect_assist.similarity.embedding import EMBEDDING_NAME, EmbedResult, SimilarityEmbedder
from defect_assist.similarity.index import SimilarityIndex
from defect_assist.similarity.indexing import IndexReport, content_hash, update_index
from defect_assist.similarity.mvtec import ImageRecord, walk_folder

logger = logging.getLogger(__name__)

SIMILARITY_KEY = "similarity"
VISUALIZATION_KEY = "embeddings_viz"
HASH_FIELD = "content_hash"
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


def sample_records(samples: fo.core.collections.SampleCollection) -> list[ImageRecord]:
    """The index records of ``samples`` (path, split, label, defect type, category), in order."""
    paths, splits, truths, types, categories = samples.values(
        ["filepath", "split", "ground_truth", "defect_type", "category"]
    )
    return [
        ImageRecord(Path(p), s, (g.label if g else None), t, None, c)
        for p, s, g, t, c in zip(paths, splits, truths, types, categories, strict=True)
    ]


def add_predictions(
    samples: fo.core.collections.SampleCollection,
    embedder: SimilarityEmbedder,
    media_dir: Path,
    index: SimilarityIndex,
    batch_size: int = 16,
    reembed_stale: bool = True,
    progress: ProgressCallback | None = None,
) -> IndexReport:
    """(Re)compute the predictions of ``samples`` in place, their embeddings through the project ``index``.

    Images the index holds for ``embedder.model_version`` are only predicted (heatmaps, masks) and get
    the stored vector; the others are embedded once (:func:`update_index`, which keeps the predictions
    of that pass) and written to the index. Returns the index update's report.
    """
    ids, paths = samples.values("id"), samples.values("filepath")
    digests = [content_hash(p) for p in paths]
    dataset = samples._dataset
    version = embedder.model_version
    done: set[int] = set()

    def store(i: int, prediction: Prediction, vector: np.ndarray | None) -> None:
        sample = dataset[ids[i]]
        stem = Path(paths[i]).stem + "_" + ids[i][-8:]
        for key, value in prediction_fields(prediction, stem, media_dir, version).items():
            sample[key] = value
        sample[HASH_FIELD] = digests[i]
        sample["embedding"] = None if vector is None or np.isnan(vector).any() else vector
        sample.save()
        done.add(i)

    def embedded(chunk: list[int], result: EmbedResult) -> None:
        for j, i in enumerate(chunk):
            store(i, result.predictions[j], result.vectors[j])

    index.mark_stale(version)
    report = update_index(
        index,
        embedder,
        sample_records(samples),
        version,
        reembed_stale=reembed_stale,
        batch_size=batch_size,
        progress=progress,
        digests=digests,
        on_embedded=embedded,
    )
    rest = [i for i in range(len(ids)) if i not in done]  # indexed already (or byte-identical copies)
    stored = index.vectors([digests[i] for i in rest])
    for start in range(0, len(rest), batch_size):
        chunk = rest[start : start + batch_size]
        for i, prediction in zip(chunk, embedder.predict([paths[i] for i in chunk]), strict=True):
            found = stored.get(digests[i])
            store(i, prediction, None if found is None else found[0])
        if progress:
            progress("predict", min(start + batch_size, len(rest)), len(rest))
    return report


def compute_brain_runs(dataset: fo.Dataset, index: SimilarityIndex) -> dict[str, Any]:
    """2-D visualisation from the ``embedding`` field and the ``similarity`` run on the project ``index``
    (replacing old runs; the index itself is kept)."""
    register_backend()
    view = dataset.exists("embedding")
    for key in (VISUALIZATION_KEY, SIMILARITY_KEY):
        if key in dataset.list_brain_runs():
            if key == SIMILARITY_KEY:
                try:  # a run on the project index leaves it alone; an older per-dataset one is dropped
                    dataset.load_brain_results(key).cleanup()
                except Exception as error:  # a vanished collection must not block a rebuild
                    logger.warning("could not clean up similarity index: %s", error)
            dataset.delete_brain_run(key)
    method = visualization_method()
    fob.compute_visualization(
        view, embeddings="embedding", method=method, brain_key=VISUALIZATION_KEY, num_dims=2, verbose=False
    )
    options: dict[str, Any] = {"url": index.url} if index.url else {"path": str(index.path)}
    fob.compute_similarity(
        dataset,
        embeddings=False,  # nothing to add: the run reads the points update_index wrote
        backend=BACKEND_NAME,
        brain_key=SIMILARITY_KEY,
        metric="cosine",
        collection_name=index.collection,
        hash_field=HASH_FIELD,
        **options,
    )
    return {
        "visualization": method,
        "similarity_backend": BACKEND_NAME,
        "collection": index.collection,
        **options,
    }


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
    index: SimilarityIndex | None = None,
) -> fo.Dataset:
    """A FiftyOne dataset of ``data`` (a folder or records) with predictions, embeddings and brain runs.

    Embeddings go through ``project``'s similarity index (``index``, else the one at ``qdrant_url`` /
    ``qdrant_path``, default ``QDRANT_URL`` / ``QDRANT_PATH``): what it holds for ``model_version`` is
    reused, what is new is embedded and added. ``info["defect_assist"]["index"]`` reports the update.
    """
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
    if index is None:
        if qdrant_path is None and not qdrant_url:
            from defect_assist.core.settings import get_settings

            settings = get_settings()
            qdrant_path, qdrant_url = settings.qdrant_path, settings.qdrant_url or None
        index = SimilarityIndex(project, path=qdrant_path, url=qdrant_url or None)
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
        (HASH_FIELD, fo.StringField),
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
    report = add_predictions(dataset, embedder, media, index, progress=progress)
    runs = compute_brain_runs(dataset, index)
    dataset.info = {
        "defect_assist": {
            "project": project,
            "model_version": model_version,
            "model_kind": model.kind,
            "embedding": EMBEDDING_NAME,
            "media_dir": str(media),
            "source": str(data) if isinstance(data, str | Path) else "",
            "index": report.summary(),
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

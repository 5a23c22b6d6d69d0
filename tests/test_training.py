"""The retrain job's pieces without a queue: LS annotation parsing, image cache, mode choice, and a
full/incremental train → evaluate on labeled anomalies → calibrate → publish run (tiny PatchCore)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.unit


def _brush(mask: np.ndarray) -> dict:
    from label_studio_sdk.converter.brush import mask2rle

    return {
        "from_name": "defect_mask",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": mask.shape[1],
        "original_height": mask.shape[0],
        "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": ["defect"]},
    }


def test_annotation_verdicts_and_brush_masks():
    from defect_assist.label_studio.annotations import classify_annotation, labeled_images

    choice = {"from_name": "verdict", "to_name": "image", "type": "choices"}
    mask = np.zeros((20, 30), bool)
    mask[5:9, 10:20] = True
    assert classify_annotation([choice | {"value": {"choices": ["normal"]}}])[0] == "normal"
    assert classify_annotation([])[0] == "normal"  # no defect region drawn
    verdict, decoded, regions = classify_annotation(
        [choice | {"value": {"choices": ["anomalous"]}}, _brush(mask)]
    )
    assert verdict == "anomalous" and regions == 1 and np.array_equal(decoded, mask)
    assert classify_annotation([_brush(mask)])[0] == "anomalous"  # a region without a verdict
    tasks = [
        {
            "id": 1,
            "data": {"image": "/data/local-files/?d=a.jpg"},
            "annotations": [
                {"id": 1, "result": [_brush(mask)], "updated_at": "2026-01-01"},
                {"id": 2, "result": [], "updated_at": "2026-01-02"},
            ],
        },  # relabeled normal later
        {
            "id": 2,
            "data": {"image": "/data/upload/b.png"},
            "annotations": [{"id": 3, "result": [], "was_cancelled": True}],
        },
        {"id": 3, "data": {"img": "/data/upload/c.png"}, "annotations": []},
    ]
    found = labeled_images(tasks)
    assert [(f.task_id, f.verdict) for f in found] == [(1, "normal")]


def test_image_cache_is_content_addressed(tmp_path: Path):
    from defect_assist.training.image_cache import ImageCache, digest_of

    cache = ImageCache(tmp_path)
    first = cache.put(b"same bytes", "/data/local-files/?d=x/a.jpg")
    second = cache.put(b"same bytes", "/data/upload/b.jpg")
    assert first.parent == second.parent and first.stem == second.stem  # one file per content
    assert cache.lookup("/data/local-files/?d=x/a.jpg") == first and cache.lookup("/never/seen") is None
    assert digest_of(first) == first.stem


def test_train_evaluate_calibrate_publish_full_then_incremental(
    tmp_path: Path, train_normals, magnetic_tile, monkeypatch
):
    from defect_assist.core.settings import Settings
    from defect_assist.core.store import ModelStore
    from defect_assist.similarity.index import SimilarityIndex
    from defect_assist.training.image_cache import digest_of
    from defect_assist.training.pipeline import train_and_publish

    settings = Settings(
        model_dir=tmp_path / "models",
        cache_dir=tmp_path / "cache",
        qdrant_path=tmp_path / "qdrant",
        device="cpu",
    )
    anomalies = []
    for name in sorted((magnetic_tile / "test" / "break").glob("*.jpg"))[:3]:
        mask = (
            np.asarray(
                Image.open(magnetic_tile / "ground_truth" / "break" / f"{name.stem}_mask.png").convert("L")
            )
            > 0
        )
        anomalies.append((name, mask))
    normals = list(train_normals[:14])
    full = train_and_publish(
        "3", normals, anomalies, settings=settings, mode="auto", options={"image_size": 64}
    )
    assert full["mode"] == "full" and full["version"] == "v0001-patchcore"
    assert 0.0 <= full["metrics"]["image_auroc"] <= 1.0 and "pixel_auroc" in full["metrics"]
    store = ModelStore(settings.model_dir)
    meta = store.current("3").metadata
    assert meta["calibration"]["source"].startswith("held-out normals + labeled anomalies")
    assert meta["n_train_images"] == 14 and len(meta["extra"]["training_images"]) == 14
    assert full["metrics"]["defect_head"]["n_corrected"] == 3  # the served masks learned from the 3
    assert store.load("3", "v0001-patchcore", device="cpu").metadata.extra["defect_head"]["served"]

    assert full["similarity_stale_points"] is None  # no similarity index yet

    index = SimilarityIndex.from_settings("3", settings)  # one image embedded by v0001
    index.upsert(np.ones((1, 4)), [{"content_hash": "ab" * 32, "model_version": "v0001-patchcore"}])
    index.close()
    more = [*normals, *train_normals[14:18]]
    incremental = train_and_publish("3", more, [], settings=settings, mode="auto")
    assert incremental["mode"] == "incremental" and incremental["trained_on"] == 4
    assert incremental["similarity_stale_points"] == 1  # the retrain marks older embeddings stale
    index = SimilarityIndex.from_settings("3", settings)
    assert index.payloads(["ab" * 32])["ab" * 32]["stale"] is True
    index.close()
    assert store.current("3").metadata["update"] == "incremental"
    assert store.current("3").metadata["n_train_images"] == 18
    assert store.current("3").metadata["extra"]["check"]["n_check_defects"] == 3  # v0001's defects kept

    relabeled = train_and_publish("3", [], [(more[0], None)], settings=settings)  # a trained normal → defect
    assert relabeled["mode"] == "full" and "marked defective" in relabeled["mode_reason"]
    assert relabeled["trained_on"] == 17 and relabeled["n_defects_excluded"] == 4
    extra = store.version("3", relabeled["version"]).metadata["extra"]
    assert digest_of(more[0]) in extra["defect_images"] and digest_of(more[0]) not in extra["training_images"]
    assert len(extra["training_images"]) == 17  # the other earlier normals came back from MODEL_DIR/3/_images
    with pytest.raises(ValueError, match="no normal images"):
        train_and_publish("4", [], anomalies, settings=settings)

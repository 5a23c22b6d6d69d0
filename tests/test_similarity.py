"""Similarity search on real Qdrant local storage with a real (small) PatchCore: index, update, query."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from defect_assist.core.models.registry import create_model
from defect_assist.core.store import ModelStore
from defect_assist.similarity.embedding import SimilarityEmbedder, verdict_vector
from defect_assist.similarity.index import SimilarityIndex
from defect_assist.similarity.indexing import content_hash, query_similar, update_index
from defect_assist.similarity.local_storage import IndexBusyError, LocalStorage
from defect_assist.similarity.mvtec import walk_folder

pytestmark = pytest.mark.unit

PROJECT = "sim"


@pytest.fixture(scope="module")
def tile_folder(make_tiny_mvtec) -> Path:
    """A small MVTec-layout copy: 12 train normals, 4 test normals, 3 break + 3 uneven with masks."""
    return make_tiny_mvtec(n_train=12, train_every=50, n_good=4, good_every=35, defect_every=10)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tile_folder: Path) -> ModelStore:
    """A model store holding one PatchCore (64 px) trained on the 12 train normals."""
    import torch

    torch.manual_seed(0)
    model = create_model("patchcore", device="cpu", image_size=64)
    model.fit(sorted((tile_folder / "train" / "good").glob("*.jpg")))
    models = ModelStore(tmp_path_factory.mktemp("models"))
    models.publish(PROJECT, model)
    return models


def test_walk_folder_reads_mvtec_layout(tile_folder: Path) -> None:
    records = walk_folder(tile_folder)
    assert len(records) == 12 + 4 + 6
    by_type: dict[str, int] = {}
    for r in records:
        by_type[r.defect_type or ""] = by_type.get(r.defect_type or "", 0) + 1
        assert (r.label == "normal") == (r.defect_type == "good")
        assert (r.mask_path is not None) == (r.label == "anomalous")
    assert by_type == {"good": 16, "break": 3, "uneven": 3}
    assert {r.split for r in records} == {"train", "test"}
    plain = walk_folder(tile_folder / "test" / "break")  # not an MVTec root: labels unknown
    assert len(plain) == 3 and all(r.label is None and r.split is None for r in plain)


def test_verdict_vector_separates_normal_and_anomalous() -> None:
    v = verdict_vector(np.array([0.0, 0.1, 0.9, 1.0, np.nan]))
    assert np.allclose(np.linalg.norm(v[:4], axis=1), 1.0) and np.allclose(v[4], 0.0)
    assert v[0] @ v[1] > 0.98 and v[0] @ v[3] < 1e-6 and v[2] @ v[3] > 0.98


def test_one_pass_gives_the_two_pass_predictions_and_embeddings(
    tile_folder: Path, store: ModelStore, tmp_path: Path
) -> None:
    """``predict_and_embed`` (one decode, one backbone forward) = ``predict`` + the model's own
    ``embed`` of each decoded batch (the two passes indexing took before), an unreadable image included."""
    model = store.load(PROJECT, device="cpu")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    images = [*sorted((tile_folder / "test").rglob("*.jpg")), broken]
    predictions, embedded = model.predict_and_embed(images, batch_size=4)
    for one, other in zip(predictions, model.predict(images, batch_size=4), strict=True):
        assert one.ok == other.ok
        if one.ok:
            assert one.raw_score == pytest.approx(other.raw_score, rel=1e-5)
            assert np.array_equal(one.mask, other.mask)
            assert np.allclose(one.anomaly_map, other.anomaly_map, atol=1e-5)
    readable = images[:-1]
    for start in range(0, len(readable), 4):
        reference = model.embed(model.load_batch(readable[start : start + 4]).tensor)
        rows = slice(start, start + len(reference.pooled))
        assert np.allclose(embedded.pooled[rows], reference.pooled.numpy(), atol=1e-5)
        assert np.allclose(embedded.defect[rows], reference.defect.numpy(), atol=1e-5)
    assert np.isnan(embedded.pooled[-1]).all() and embedded.errors[-1] is not None


def test_index_incremental_query_and_stale(tile_folder: Path, store: ModelStore, tmp_path: Path) -> None:
    version = store.current_version(PROJECT)
    embedder = SimilarityEmbedder(store.load(PROJECT, device="cpu"), version)
    records = walk_folder(tile_folder)
    with SimilarityIndex(PROJECT, path=tmp_path / "qdrant") as index:
        first = update_index(index, embedder, records[:-2], version)
        assert (first.added, first.unchanged, first.total) == (20, 0, 20)
        again = update_index(index, embedder, records, version)  # only the 2 new images are embedded
        assert (again.added, again.unchanged, again.reembedded, again.total) == (2, 20, 0, 22)

        point = index.payloads([content_hash(records[-1].path)])[content_hash(records[-1].path)]
        assert point["label"] == "anomalous" and point["defect_type"] == "uneven" and point["split"] == "test"
        assert point["model_version"] == version and point["stale"] is False and 0.0 <= point["score"] <= 1.0
        assert set(point) >= {"path", "split", "label", "defect_type", "score", "ls_task_id", "model_version"}

        query = records[-1].path
        verdict, neighbours = query_similar(index, embedder, query, k=5)
        assert len(neighbours) == 5 and str(query) not in [n.payload["path"] for n in neighbours]
        sims = [n.similarity for n in neighbours]
        assert sims == sorted(sims, reverse=True) and all(-1.0 <= s <= 1.0 for s in sims)
        assert verdict["score"] == pytest.approx(point["score"], abs=1e-4)

        # a renamed file keeps its vector: only the payload path changes
        moved = tmp_path / "renamed.jpg"
        shutil.copy(records[0].path, moved)
        renamed = [*records[1:], type(records[0])(moved, "train", "normal", "good", None, "tile")]
        third = update_index(index, embedder, renamed, version)
        assert (third.added, third.payload_updated, third.total) == (0, 1, 22)
        assert index.payloads([content_hash(moved)])[content_hash(moved)]["path"] == str(moved)

        # new model version: everything is marked stale, then re-embedded by the next update
        assert index.mark_stale("v9999-patchcore") == 22
        assert index.count(stale=True) == 22
        fresh = update_index(
            index, SimilarityEmbedder(embedder.model, "v9999-patchcore"), records, "v9999-patchcore"
        )
        assert (fresh.reembedded, fresh.added, index.count(stale=True)) == (22, 0, 0)
        hits = index.search(np.nan_to_num(embedder.embed([query]).vectors[0]), k=3, where={"label": "normal"})
        assert len(hits) == 3 and all(h.payload["label"] == "normal" for h in hits)


def test_cli_index_and_similar_json(tile_folder: Path, store: ModelStore, tmp_path: Path) -> None:
    from defect_assist_tools.cli import app

    runner = CliRunner()
    common = [
        "--project",
        PROJECT,
        "--model-dir",
        str(store.root),
        "--qdrant-path",
        str(tmp_path / "q"),
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, ["index", "--data", str(tile_folder), *common], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["added"] == 22 and report["total_points"] == 22 and report["failed"] == 0
    query = next((tile_folder / "test" / "break").glob("*.jpg"))
    result = runner.invoke(
        app, ["similar", str(query), "--k", "4", "--json", *common], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert len(answer["neighbours"]) == 4 and answer["model_version"] == store.current_version(PROJECT)
    assert all(
        {"similarity", "label", "defect_type", "score", "path"} <= set(n) for n in answer["neighbours"]
    )
    table = runner.invoke(app, ["similar", str(query), "--k", "3", *common], catch_exceptions=False)
    assert table.exit_code == 0 and "similarity" in table.stdout


def test_http_similar_endpoint(tile_folder: Path, store: ModelStore, tmp_path: Path, monkeypatch) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from defect_assist.core.settings import get_settings
    from defect_assist.label_studio.image_sources import ImageSources
    from defect_assist.serving.similarity_routes import router

    monkeypatch.setenv("MODEL_DIR", str(store.root))
    monkeypatch.setenv("QDRANT_PATH", str(tmp_path / "q"))
    monkeypatch.setenv("QDRANT_URL", "")
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("IMAGE_LOCAL_ROOTS", str(tile_folder))  # ?path= reads only under the local roots
    get_settings.cache_clear()
    try:
        version = store.current_version(PROJECT)
        with SimilarityIndex(PROJECT, path=tmp_path / "q") as index:
            update_index(
                index,
                SimilarityEmbedder(store.load(PROJECT, device="cpu"), version),
                walk_folder(tile_folder),
                version,
            )
        app = FastAPI()
        app.include_router(router)
        settings = get_settings()
        app.state.image_sources = ImageSources.from_settings(settings, settings.max_image_bytes)
        client = TestClient(app)
        query = next((tile_folder / "test" / "uneven").glob("*.jpg"))
        by_path = client.get("/similar", params={"path": str(query), "project": PROJECT, "k": 3})
        assert by_path.status_code == 200, by_path.text
        assert len(by_path.json()["neighbours"]) == 3
        assert str(query) not in [n["path"] for n in by_path.json()["neighbours"]]
        upload = client.post(
            "/similar",
            params={"project": PROJECT, "k": 2},
            files={"image": (query.name, query.read_bytes(), "image/jpeg")},
        )
        assert upload.status_code == 200, upload.text
        body = upload.json()
        assert body["query"]["path"] == query.name and len(body["neighbours"]) == 2
        assert body["neighbours"][0]["path"] == str(query) and body["neighbours"][0]["similarity"] > 0.999
        assert client.get("/similar", params={"path": str(query), "project": "nope"}).status_code == 404
        outside = tmp_path / "outside.jpg"
        outside.write_bytes(query.read_bytes())
        refused = client.get("/similar", params={"path": str(outside), "project": PROJECT})
        assert refused.status_code == 404 and "no such image" in refused.text  # as if it did not exist

        # one request opens the embedded storage once (count, stored-vector lookup and search)
        connect = LocalStorage._connect
        openings: list[Path] = []

        def counting(storage: LocalStorage, *args):
            openings.append(storage.path)
            return connect(storage, *args)

        monkeypatch.setattr(LocalStorage, "_connect", counting)
        assert client.get("/similar", params={"path": str(query), "project": PROJECT}).status_code == 200
        assert len(openings) == 1

        # storage held by another client: 503 with the holder named and a Retry-After
        from qdrant_client import QdrantClient

        from defect_assist.similarity import service

        open_context = service.open_context

        def impatient(*args, **kwargs):
            context = open_context(*args, **kwargs)
            context.index.lock_wait_s = 0.2
            return context

        monkeypatch.setattr(service, "open_context", impatient)
        holder = QdrantClient(path=str(tmp_path / "q"))
        try:
            busy = client.get("/similar", params={"path": str(query), "project": PROJECT})
        finally:
            holder.close()
        assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
        assert "held by" in busy.json()["detail"]
    finally:
        get_settings.cache_clear()


def test_embedded_storage_is_held_only_during_an_operation(tmp_path: Path) -> None:
    """Local mode locks a folder to one client: the index opens it per operation, shares one opening
    between the objects of a process, waits for another holder and then names it."""
    from qdrant_client import QdrantClient

    path = tmp_path / "q"
    index = SimilarityIndex(PROJECT, path=path, lock_wait_s=0.3)
    digests = ["ab" * 32, "cd" * 32]
    index.upsert(np.eye(2, 4), [{"content_hash": d, "model_version": "v1"} for d in digests])
    with index.session():  # e.g. the backend's route and a CLI command in one process: in turn
        assert SimilarityIndex(PROJECT, path=path).count() == 2
        assert set(index.vectors(digests)) == set(digests)

    holder = QdrantClient(path=str(path))  # free between operations: any client can open it
    try:
        with pytest.raises(IndexBusyError, match=rf"held by this process \(pid {os.getpid()}.*QDRANT_URL"):
            index.count()
    finally:
        holder.close()

    holder = QdrantClient(path=str(path))
    threading.Timer(0.5, holder.close).start()  # a holder that lets go within the wait is waited for
    assert SimilarityIndex(PROJECT, path=path, lock_wait_s=20).count() == 2

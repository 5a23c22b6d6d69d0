"""The similarity-at-scale benchmark (benchmarks/similarity_scale.py) on a small set, and the
qdrant-edge behaviours an embedded-engine switch would have to handle."""

from __future__ import annotations

import importlib.util
import json
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.unit

qe = pytest.importorskip("qdrant_edge")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "similarity_scale.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))  # the benchmarks import their shared helpers (_serving)
    spec = importlib.util.spec_from_file_location("similarity_scale", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vectors_are_seeded_product_shaped_and_queries_held_out(bench) -> None:
    data = bench.clustered_vectors(500, 306, seed=3)
    again = bench.clustered_vectors(500, 306, seed=3)
    queries = bench.clustered_vectors(500, 306, seed=3, draw=1)
    assert data.shape == (500, 306) and data.dtype == np.float32 and np.array_equal(data, again)
    assert not np.isin(queries, data).all(axis=1).any()
    # global, defect and verdict parts are each unit length (SimilarityEmbedder's combine)
    for part in (data[:, :152], data[:, 152:304], data[:, 304:]):
        assert np.allclose(np.linalg.norm(part, axis=1), 1.0, atol=1e-5)


def test_exact_top_and_recall(bench) -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(300, 16)).astype(np.float32)
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    q = rng.normal(size=16).astype(np.float32)
    top = bench.exact_top(unit, q)
    assert list(top) == list(np.argsort(-(unit @ (q / np.linalg.norm(q))))[:10])
    truth = np.array([top, top])
    assert bench.recall([list(top), list(top[:5]) + [-1] * 5], truth) == pytest.approx(0.75)


def test_edge_engine_finds_the_exact_top_10(bench) -> None:
    data = bench.clustered_vectors(1200, 34, seed=1)
    queries = bench.clustered_vectors(20, 34, seed=1, draw=1)
    payloads = bench.payloads(len(data))
    row, truth = bench.bench_numpy(data, queries)
    assert row["queries"] == 20 and truth.shape == (20, 10)
    rows = bench.bench_edge(
        data, queries, truth, payloads, efs=[128], m=16, ef_construct=64, full_scan_kb=1, indexing_kb=1
    )
    assert len(rows) == 2 and all(r["engine"].startswith("qdrant-edge") for r in rows)
    assert rows[0]["recall_at_10"] == 1.0  # unindexed: an exact scan
    assert rows[1]["recall_at_10"] >= 0.95 and rows[1]["indexed_vectors"] == len(data)
    assert rows[1]["reopen_s"] >= 0


def test_main_writes_the_json_report(bench, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "scale.json"
    argv = ["similarity_scale.py", "--n", "400", "--dim", "34", "--queries", "12", "--hnsw-ef", "64"]
    argv += ["--local-disk-n", "50", "--local-budget-s", "5", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    report = json.loads(out.read_text())
    assert report["n_vectors"] == 400 and report["dim"] == 34 and report["cpu"]
    assert set(report["versions"]) == {"numpy", "qdrant-client", "qdrant-edge-py"}
    engines = [r["engine"] for r in report["engines"]]
    assert engines[0] == "numpy exact" and engines[-1] == "qdrant-client local" and len(engines) == 4
    for r in report["engines"]:
        assert r["recall_at_10"] >= 0.95 and r["query_ms_median"] > 0 and r["upserts_per_s"] > 0
        assert r["x_goal"] == pytest.approx(r["query_ms_median"] / 20.0, abs=0.01)
    assert report["engines"][-1]["recall_at_10"] == 1.0


def _shard(tmp_path: Path):
    shard = qe.EdgeShard.create(
        str(tmp_path / "shard"),
        qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=4, distance=qe.Distance.Cosine)),
    )
    points = [
        qe.Point(
            str(uuid.UUID(int=i)),
            [1.0, float(i), 0.0, 0.0],
            {"stale": i % 2 == 1, "v": "a" if i < 3 else "b"},
        )
        for i in range(6)
    ]
    shard.update(qe.UpdateOperation.upsert_points(points))
    return shard


def test_edge_payload_operations_the_index_uses(tmp_path: Path) -> None:
    """String matches, id exclusion, filtered payload updates, facets and reopening work in-process;
    the shard's WAL is locked to one opener at a time (like qdrant-client local mode's folder)."""
    shard = _shard(tmp_path)
    count = lambda flt: shard.count(qe.CountRequest(exact=True, filter=flt))  # noqa: E731
    assert count(qe.Filter(must=[qe.FieldCondition(key="v", match=qe.MatchValue("a"))])) == 3
    assert count(qe.Filter(must_not=[qe.HasIdCondition({str(uuid.UUID(int=0))})])) == 5
    not_a = qe.Filter(must_not=[qe.FieldCondition(key="v", match=qe.MatchValue("a"))])
    shard.update(qe.UpdateOperation.set_payload_by_filter(not_a, {"stale": True}))
    shard.update(qe.UpdateOperation.create_field_index("stale", qe.PayloadSchemaType.Bool))  # for facets
    facet = shard.facet(qe.FacetRequest(key="stale", limit=10, exact=True))
    assert {h.value: h.count for h in facet.hits} == {True: 4, False: 2}
    hits = shard.query(
        qe.QueryRequest(limit=2, query=qe.Query.Nearest([1.0, 0.0, 0.0, 0.0]), with_payload=True)
    )
    assert str(hits[0].id) == str(uuid.UUID(int=0)) and hits[0].score == pytest.approx(1.0)
    shard.close()
    reopened = qe.EdgeShard.load(str(tmp_path / "shard"))
    try:
        record = reopened.retrieve([str(uuid.UUID(int=5))], with_payload=True, with_vector=True)[0]
        assert record.payload == {"stale": True, "v": "b"} and len(record.vector) == 4
    finally:
        reopened.close()


@pytest.mark.skipif(
    not __import__("importlib.metadata").metadata.version("qdrant-edge-py").startswith("0.9."),
    reason="pins the qdrant-edge-py 0.9 binding",
)
def test_edge_0_9_bool_match_matches_nothing(tmp_path: Path) -> None:
    """qdrant-edge-py 0.9 turns ``MatchValue(True/False)`` into an integer, so it never matches a
    boolean payload: ``SimilarityIndex.count(stale=...)`` would need a facet (or an int flag) on it."""
    shard = _shard(tmp_path)
    try:
        for flag in (True, False):
            match = qe.Filter(must=[qe.FieldCondition(key="stale", match=qe.MatchValue(flag))])
            assert shard.count(qe.CountRequest(exact=True, filter=match)) == 0
    finally:
        shard.close()

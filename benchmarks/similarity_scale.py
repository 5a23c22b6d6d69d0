"""Similarity at scale (issue 18): embedded top-10 search over 100k vectors, three engines, one run.

Engines, all in this process, each fed the same vectors and payloads and asked the same queries
(one at a time, single-threaded client, after ``WARMUP`` untimed ones):

* ``qdrant-client local`` — today's embedded path (``SimilarityIndex`` without ``QDRANT_URL``).
  Its on-disk ingest (one SQLite row per point) runs at a few hundred points/s, so ingest is timed on
  disk for ``--local-disk-n`` points (and the reopening of that folder, which every operation pays);
  the 100k query latency is taken on a ``:memory:`` client (local mode searches the same in-RAM
  arrays either way), through ``SimilarityIndex.search``, capped at ``--local-budget-s`` seconds.
* ``qdrant-edge`` — the Qdrant engine in-process (``qdrant-edge-py``): one shard on disk, points
  upserted in batches of 256 as ``SimilarityIndex.upsert`` does, searched once unindexed (exact,
  before ``optimize``) and then with the HNSW index ``optimize()`` builds, at several ``hnsw_ef``.
* ``numpy exact`` — brute-force cosine (one matrix-vector product and ``argpartition``): the
  ground truth for recall@10 and a baseline.

Vectors: ``--vectors FILE.npz`` (key ``vectors``, e.g. the cache ``benchmarks/similarity.py``
writes) tiles real embeddings with noise; by default seeded clustered vectors shaped like the
product's (``combine`` of a 152-D global part, a 152-D defect part and the 2-D verdict part, 306-D
as ``SimilarityEmbedder`` gives for the default PatchCore). Queries are drawn from the same
distribution and are not in the index. Usage::

    .venv/bin/python benchmarks/similarity_scale.py --json artifacts/similarity_scale.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from _serving import cpu_model

from defect_assist.similarity.embedding import combine
from defect_assist.similarity.index import SimilarityIndex, point_id
from defect_assist.similarity.indexing import point_payload
from defect_assist.similarity.mvtec import ImageRecord

GOAL_MS = 20.0
K = 10
PRODUCT_DIM = 306  # SimilarityEmbedder on the default PatchCore: 2 x 152 channels + 2 (verdict)
BATCH = 256  # SimilarityIndex.upsert's batch
WARMUP = 5  # untimed queries before each engine's timed ones (page cache, lazy loading)


# ------------------------------------------------------------------------------------ data
def clustered_vectors(n: int, dim: int, seed: int, draw: int = 0, groups: int = 1000) -> np.ndarray:
    """``n`` product-shaped vectors: global and defect parts around seeded cluster centres, verdicts
    from beta-distributed scores (one image in ten anomalous). Same seed, same centres; ``draw``
    picks an independent set of points around them (the queries)."""
    feat = max((dim - 2) // 2, 1)
    centres = np.random.default_rng(seed)
    g_centres = centres.normal(size=(groups, feat)).astype(np.float32)
    d_centres = centres.normal(size=(groups // 2, feat)).astype(np.float32)
    rng = np.random.default_rng([seed, draw + 1])
    g = g_centres[rng.integers(0, groups, n)] + rng.normal(0, 0.6, (n, feat)).astype(np.float32)
    d = d_centres[rng.integers(0, groups // 2, n)] + rng.normal(0, 0.6, (n, feat)).astype(np.float32)
    anomalous = rng.random(n) < 0.1
    scores = np.where(anomalous, rng.beta(5, 2, n), rng.beta(2, 5, n))
    out = combine(g, d, scores)
    if out.shape[1] < dim:  # odd --dim: pad
        out = np.pad(out, ((0, 0), (0, dim - out.shape[1])))
    return np.ascontiguousarray(out[:, :dim], dtype=np.float32)


def tiled_vectors(real: np.ndarray, n: int, seed: int, noise: float = 0.02) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = real[rng.integers(0, len(real), n)]
    return (base + rng.normal(0, noise, base.shape)).astype(np.float32)


def payloads(n: int) -> list[dict[str, Any]]:
    """Product payloads (``point_payload``) for ``n`` synthetic images."""
    out = []
    for i in range(n):
        label = "anomalous" if i % 10 == 0 else "normal"
        record = ImageRecord(Path(f"/data/img_{i:06d}.jpg"), "test", label, None, None, "tile")
        digest = hashlib.sha256(str(i).encode()).hexdigest()
        out.append(point_payload(record, digest, 0.7 if i % 10 == 0 else 0.2, "v0001", None))
    return out


def exact_top(data_unit: np.ndarray, query: np.ndarray, k: int = K) -> np.ndarray:
    """Indices of the ``k`` rows of unit ``data_unit`` most cosine-similar to ``query``, best first."""
    sims = data_unit @ (query / max(float(np.linalg.norm(query)), 1e-12))
    top = np.argpartition(-sims, k)[:k]
    return top[np.argsort(-sims[top])]


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def stats(times_s: list[float]) -> dict[str, float]:
    t = np.array(times_s) * 1000
    med = float(np.median(t))
    return {
        "queries": len(t),
        "query_ms_median": round(med, 2),
        "query_ms_p95": round(float(np.percentile(t, 95)), 2),
        "x_goal": round(med / GOAL_MS, 2),
    }


# ------------------------------------------------------------------------------------ engines
def bench_numpy(data: np.ndarray, queries: np.ndarray) -> tuple[dict, np.ndarray]:
    started = time.perf_counter()
    unit = data / np.maximum(np.linalg.norm(data, axis=1, keepdims=True), 1e-12)
    ingest_s = time.perf_counter() - started
    for q in queries[:WARMUP]:
        exact_top(unit, q)
    truth, times = [], []
    for q in queries:
        t0 = time.perf_counter()
        truth.append(exact_top(unit, q))
        times.append(time.perf_counter() - t0)
    return {
        "engine": "numpy exact",
        "upserts_per_s": round(len(data) / ingest_s),
        "recall_at_10": 1.0,
        **stats(times),
    }, np.array(truth)


def bench_local(data, queries, truth, pl, disk_n: int, budget_s: float) -> dict:
    """qdrant-client local mode: on-disk ingest of ``disk_n`` points, then 100k queries in RAM."""
    from qdrant_client import QdrantClient

    out: dict[str, Any] = {"engine": "qdrant-client local"}
    with tempfile.TemporaryDirectory() as tmp:
        index = SimilarityIndex("scale", path=tmp)
        started = time.perf_counter()
        index.upsert(data[:disk_n], pl[:disk_n], batch_size=BATCH)
        out["upserts_per_s"] = round(disk_n / (time.perf_counter() - started))
        out["upsert_note"] = f"on disk, first {disk_n:,} points"
        started = time.perf_counter()
        assert index.count() == disk_n  # one operation: open the folder (loads every point), count
        out[f"open_s_at_{disk_n}"] = round(time.perf_counter() - started, 2)
    with SimilarityIndex("scale", client=QdrantClient(location=":memory:")) as index:
        started = time.perf_counter()
        index.upsert(data, pl, batch_size=BATCH)
        out["upserts_per_s_memory"] = round(len(data) / (time.perf_counter() - started))
        found, times = [], []
        positions = {point_id(p["content_hash"]): i for i, p in enumerate(pl)}
        for q in queries[:WARMUP]:
            index.search(q, k=K)
        deadline = time.perf_counter() + budget_s
        for q in queries:
            t0 = time.perf_counter()
            hits = index.search(q, k=K)
            times.append(time.perf_counter() - t0)
            found.append([positions[h.id] for h in hits])
            if time.perf_counter() > deadline and len(times) >= 20:
                break
    return {**out, "recall_at_10": round(recall(found, truth[: len(found)]), 4), **stats(times)}


def bench_edge(
    data: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    pl: list[dict[str, Any]],
    efs: list[int],
    m: int,
    ef_construct: int,
    full_scan_kb: int = 10_000,
    indexing_kb: int | None = None,
) -> list[dict]:
    """qdrant-edge: ingest, exact scan, ``optimize()`` (HNSW build), HNSW queries at each ``hnsw_ef``,
    reopening. ``full_scan_kb`` / ``indexing_kb``: Qdrant's thresholds (defaults: Qdrant's)."""
    import qdrant_edge as qe

    tmp = tempfile.mkdtemp()
    rows: list[dict] = []
    try:
        config = qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=data.shape[1], distance=qe.Distance.Cosine),
            hnsw_config=qe.HnswIndexConfig(m=m, ef_construct=ef_construct, full_scan_threshold=full_scan_kb),
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=indexing_kb),
        )
        shard = qe.EdgeShard.create(os.path.join(tmp, "shard"), config)
        positions = {point_id(p["content_hash"]): i for i, p in enumerate(pl)}
        started = time.perf_counter()
        for s in range(0, len(data), BATCH):
            points = [
                qe.Point(point_id(p["content_hash"]), v.tolist(), p)
                for v, p in zip(data[s : s + BATCH], pl[s : s + BATCH], strict=True)
            ]
            shard.update(qe.UpdateOperation.upsert_points(points))
        shard.flush()
        ingest_s = time.perf_counter() - started

        def run(params: Any, limit_n: int | None = None) -> tuple[dict, float]:
            found, times = [], []
            requests = [
                qe.QueryRequest(limit=K, query=qe.Query.Nearest(q.tolist()), with_payload=True, params=params)
                for q in queries[:limit_n]
            ]
            for request in requests[:WARMUP]:
                shard.query(request)
            for request in requests:
                t0 = time.perf_counter()
                hits = shard.query(request)
                times.append(time.perf_counter() - t0)
                found.append([positions[str(h.id)] for h in hits])
            return stats(times), recall(found, truth[: len(found)])

        plain, plain_recall = run(None, 100)
        rows.append(
            {
                "engine": "qdrant-edge, unindexed (exact scan)",
                "upserts_per_s": round(len(data) / ingest_s),
                "recall_at_10": round(plain_recall, 4),
                **plain,
            }
        )
        started = time.perf_counter()
        shard.optimize()
        build_s = time.perf_counter() - started
        info = shard.info()
        for ef in efs:
            row, rec = run(qe.SearchParams(hnsw_ef=ef))
            rows.append(
                {
                    "engine": f"qdrant-edge HNSW m={m} ef_construct={ef_construct} hnsw_ef={ef}",
                    "upserts_per_s": round(len(data) / (ingest_s + build_s)),
                    "upsert_note": f"ingest + HNSW build ({build_s:.0f} s)",
                    "recall_at_10": round(rec, 4),
                    "indexed_vectors": info.indexed_vectors_count,
                    **row,
                }
            )
        shard.close()
        started = time.perf_counter()
        shard = qe.EdgeShard.load(os.path.join(tmp, "shard"))
        assert shard.info().points_count == len(data)
        rows[-1]["reopen_s"] = round(time.perf_counter() - started, 2)
        shard.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


# ------------------------------------------------------------------------------------ report
def table(rows: list[dict]) -> str:
    lines = [
        "| engine | upserts/s | top-10 median ms | p95 ms | queries | recall@10 | × 20 ms goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ups = f"{r['upserts_per_s']:,}" + (f" ({r['upsert_note']})" if r.get("upsert_note") else "")
        lines.append(
            f"| {r['engine']} | {ups} | {r['query_ms_median']} | {r['query_ms_p95']} | {r['queries']} "
            f"| {r['recall_at_10']:.3f} | {r['x_goal']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=PRODUCT_DIM)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--vectors", type=Path, default=None, help="npz of real embeddings to tile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hnsw-ef", default="64,128,256,512")
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--ef-construct", type=int, default=100)
    parser.add_argument("--local-disk-n", type=int, default=5000)
    parser.add_argument("--local-budget-s", type=float, default=90.0)
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.vectors:
        real = np.load(args.vectors)["vectors"].astype(np.float32)
        real = real[~np.isnan(real).any(axis=1)]
        data = tiled_vectors(real, args.n, args.seed)
        queries = tiled_vectors(real, args.queries, args.seed + 1)
        source = f"{len(real)} real embeddings from {args.vectors} tiled with N(0, 0.02) noise"
    else:
        data = clustered_vectors(args.n, args.dim, args.seed)
        queries = clustered_vectors(args.queries, args.dim, args.seed, draw=1)  # not in the index
        source = "seeded random clustered vectors (product-shaped: global + defect + verdict parts)"
    pl = payloads(len(data))
    results: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("numpy", "qdrant-client", "qdrant-edge-py")},
        "n_vectors": len(data),
        "dim": int(data.shape[1]),
        "vectors": source,
        "queries": len(queries),
        "goal_ms": GOAL_MS,
    }
    print(json.dumps(results, indent=2), flush=True)
    row, truth = bench_numpy(data, queries)
    rows = [row]
    print(table(rows), flush=True)
    efs = [int(e) for e in args.hnsw_ef.split(",") if e]
    rows += bench_edge(data, queries, truth, pl, efs, args.m, args.ef_construct)
    print(table(rows[-len(efs) - 1 :]), flush=True)
    if not args.skip_local:
        rows.append(
            bench_local(data, queries, truth, pl, min(args.local_disk_n, len(data)), args.local_budget_s)
        )
    results["engines"] = rows
    print(json.dumps(results, indent=2))
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

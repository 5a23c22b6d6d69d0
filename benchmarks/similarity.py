"""Similarity-search benchmark on magnetic tile: precision@5 of label agreement and query latency.

Index = train normals + all test images of an MVTec-layout category. Every test image is a query
(itself excluded). A normal query's hit is relevant when it is normal; an anomalous query's hit when
it is anomalous *and* of the same defect type. Reported for the embedding variants (parts of
``defect_assist.similarity.embedding``): ``global`` (mean-pooled patch features only, the generic
baseline), ``global+defect`` (plus anomaly-weighted pooling) and the shipped ``global+defect+verdict``
— the last one measured end-to-end through Qdrant (local mode, ``query_points``).

Latency: ``--latency-n`` vectors (the real ones, tiled with small noise) in Qdrant local mode; top-10
``query_points`` timed over 50 queries. Usage::

    nice -n 10 .venv/bin/python benchmarks/similarity.py --data ../shared/datasets/magnetic_tile \
        --image-size 128 --json artifacts/similarity.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from defect_assist.core.models.registry import create_model, load_model, model_class
from defect_assist.similarity.embedding import WEIGHTS, SimilarityEmbedder, combine
from defect_assist.similarity.index import SimilarityIndex
from defect_assist.similarity.indexing import content_hash, point_payload
from defect_assist.similarity.mvtec import walk_folder

VARIANTS = {
    "global": {"global": 1.0, "defect": 0.0, "verdict": 0.0},
    "global+defect": {"global": 1.0, "defect": 1.0, "verdict": 0.0},
    "global+defect+verdict": WEIGHTS,
}


def precision_at_k(
    vectors: np.ndarray, labels: np.ndarray, types: np.ndarray, queries: np.ndarray, k: int = 5
) -> dict:
    """Mean precision@k of normal and anomalous queries (cosine, brute force, self excluded)."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sims = unit[queries] @ unit.T
    sims[np.arange(len(queries)), queries] = -np.inf
    top = np.argsort(-sims, axis=1)[:, :k]
    normal, anomalous = [], []
    for q, hits in zip(queries, top, strict=True):
        if labels[q] == "normal":
            normal.append(np.mean(labels[hits] == "normal"))
        else:
            anomalous.append(np.mean((labels[hits] == "anomalous") & (types[hits] == types[q])))
    return {
        "normal": float(np.mean(normal)),
        "anomalous": float(np.mean(anomalous)),
        "n_normal_queries": len(normal),
        "n_anomalous_queries": len(anomalous),
    }


def per_type(
    vectors: np.ndarray, labels: np.ndarray, types: np.ndarray, queries: np.ndarray, k: int = 5
) -> dict:
    out = {}
    for t in sorted(set(types[queries]) - {"good"}):
        sel = queries[types[queries] == t]
        out[t] = round(precision_at_k(vectors, labels, types, sel, k)["anomalous"], 3)
    return out


def latency(vectors: np.ndarray, n: int, queries: int = 50, seed: int = 0, on_disk: bool = False) -> dict:
    """Top-10 ``query_points`` latency in qdrant-client local mode with ``n`` vectors.

    Local mode keeps all vectors in RAM and searches them exactly (numpy) whether or not it persists
    to disk, so the query time is the same; ``on_disk=False`` (``:memory:``) only skips the slow
    per-point SQLite writes while loading 100k points.
    """
    from qdrant_client import QdrantClient

    rng = np.random.default_rng(seed)
    base = vectors[rng.integers(0, len(vectors), n)]
    data = (base + rng.normal(0, 0.02, base.shape)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        client = QdrantClient(path=tmp) if on_disk else QdrantClient(location=":memory:")
        with SimilarityIndex("latency", client=client) as index:
            started = time.perf_counter()
            payloads = [
                {"content_hash": hashlib.sha256(str(i).encode()).hexdigest(), "label": "normal"}
                for i in range(n)
            ]
            index.upsert(data, payloads, batch_size=2048)
            upsert_s = time.perf_counter() - started
            times = []
            for q in rng.integers(0, n, queries):
                t0 = time.perf_counter()
                index.search(data[q], k=10)
                times.append(time.perf_counter() - t0)
    t = np.array(times) * 1000
    return {
        "n_vectors": n,
        "dim": int(vectors.shape[1]),
        "upsert_seconds": round(upsert_s, 1),
        "query_ms_median": round(float(np.median(t)), 1),
        "query_ms_p95": round(float(np.percentile(t, 95)), 1),
        "backend": "qdrant-client local mode" + (" (on disk)" if on_disk else " (:memory:)"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets/magnetic_tile"
    )
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--cache", type=Path, default=Path("var/cache/bench-similarity"))
    parser.add_argument("--latency-n", type=int, default=100_000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    records = walk_folder(args.data)
    train = [r.path for r in records if r.split == "train"]
    # the cache is keyed on the whole model configuration: a change of defaults retrains
    config = model_class("patchcore").config_class.from_options({"image_size": args.image_size}).to_dict()
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    model_dir = args.cache / f"patchcore-{args.image_size}-{key}"
    started = time.perf_counter()
    if (model_dir / "weights.pt").exists():
        model = load_model(model_dir, device="cpu")
    else:
        model = create_model("patchcore", device="cpu", image_size=args.image_size)
        model.fit(train)
        model.save(model_dir)
    fit_s = time.perf_counter() - started
    embedder = SimilarityEmbedder(model, "bench")
    features = args.cache / f"vectors-{args.image_size}-{key}.npz"
    started = time.perf_counter()
    if features.exists():
        vectors = np.load(features)["vectors"]
    else:
        vectors = np.concatenate(
            [
                embedder.embed([r.path for r in records[i : i + 32]]).vectors
                for i in range(0, len(records), 32)
            ]
        )
        np.savez(features, vectors=vectors)
    embed_s = time.perf_counter() - started
    labels = np.array([r.label for r in records])
    types = np.array([r.defect_type for r in records])
    queries = np.array([i for i, r in enumerate(records) if r.split == "test"])
    dim = (vectors.shape[1] - 2) // 2
    g, d, v = vectors[:, :dim], vectors[:, dim : 2 * dim], vectors[:, 2 * dim :]
    scores = np.arctan2(v[:, 1], v[:, 0]) / (np.pi / 2)
    results: dict = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "image_size": args.image_size,
        "index_images": len(records),
        "fit_seconds": round(fit_s, 1),
        "embed_seconds": round(embed_s, 1),
        "variants": {},
    }
    for name, weights in VARIANTS.items():
        combined = combine(g, d, scores, weights)
        results["variants"][name] = {
            **precision_at_k(combined, labels, types, queries),
            "anomalous_by_type": per_type(combined, labels, types, queries),
        }
    # end to end through Qdrant: index with the shipped embedding, query every test image
    with tempfile.TemporaryDirectory() as tmp, SimilarityIndex("bench", path=tmp) as index:
        payloads = [
            point_payload(r, content_hash(r.path), float(s), "bench", None)
            for r, s in zip(records, scores, strict=True)
        ]
        index.upsert(vectors, payloads)
        hashes = [p["content_hash"] for p in payloads]
        normal, anomalous, times = [], [], []
        with index.session():  # one opening of the embedded storage: latency is the query's alone
            for q in queries:
                t0 = time.perf_counter()
                hits = index.search(vectors[q], k=5, exclude_hash=hashes[q])
                times.append(time.perf_counter() - t0)
                if labels[q] == "normal":
                    normal.append(np.mean([h.payload["label"] == "normal" for h in hits]))
                else:
                    anomalous.append(
                        np.mean(
                            [
                                h.payload["label"] == "anomalous" and h.payload["defect_type"] == types[q]
                                for h in hits
                            ]
                        )
                    )
        results["qdrant_end_to_end"] = {
            "normal": float(np.mean(normal)),
            "anomalous": float(np.mean(anomalous)),
            "query_ms_median": round(float(np.median(times)) * 1000, 1),
        }
    if args.latency_n:
        results["latency"] = latency(vectors, args.latency_n)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

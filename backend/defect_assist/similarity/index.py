"""Image embeddings in Qdrant: build, update incrementally, mark stale, query nearest neighbours.

Storage: embedded by default (qdrant-client local mode, ``QdrantClient(path=QDRANT_PATH)``: pure
Python, on disk, one process at a time per folder) or a Qdrant server when ``QDRANT_URL`` is set.
One collection per project (``defect_assist_<project>``), cosine distance, one vector per image.

Point ids are derived from the SHA-256 of the image bytes, so re-indexing a folder only embeds
images whose content is new (a moved/renamed file only gets its payload updated). Each point's
payload: ``path, split, label, defect_type, category, score, is_anomalous, ls_task_id,
model_version, embedding, content_hash, stale, indexed_at``.

New model version policy: :meth:`SimilarityIndex.mark_stale` flags every point embedded by another
version (``stale: true``, one filtered payload update, no re-embedding, so a retrain stays fast);
stale points stay searchable and are reported as stale. The next ``defect-assist index`` (or the
FiftyOne "refresh predictions" operator, or :func:`update_index` with ``reembed_stale=True``)
re-embeds them with the current version and clears the flag.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

from defect_assist.similarity.embedding import EMBEDDING_NAME, SimilarityEmbedder
from defect_assist.similarity.mvtec import ImageRecord

logger = logging.getLogger(__name__)

COLLECTION_PREFIX = "defect_assist_"
PAYLOAD_FIELDS = ("path", "split", "label", "defect_type", "score", "ls_task_id", "model_version")


def content_hash(path: str | Path) -> str:
    """SHA-256 of the file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def point_id(digest: str) -> str:
    """The Qdrant point id (a UUID) of an image with content hash ``digest``."""
    return str(uuid.UUID(digest[:32]))


@dataclass
class Neighbour:
    """One search hit."""

    id: str
    similarity: float  # cosine similarity, 1 = identical
    payload: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        keys = (*PAYLOAD_FIELDS, "category", "is_anomalous", "stale")
        return {
            "id": self.id,
            "similarity": round(self.similarity, 6),
            **{k: self.payload.get(k) for k in keys},
        }


@dataclass
class IndexReport:
    """What an index update did."""

    added: int = 0
    reembedded: int = 0
    payload_updated: int = 0
    unchanged: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    total: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "reembedded": self.reembedded,
            "payload_updated": self.payload_updated,
            "unchanged": self.unchanged,
            "failed": len(self.failed),
            "total_points": self.total,
            "seconds": round(self.seconds, 2),
        }


class SimilarityIndex:
    """One project's collection in an embedded Qdrant store or on a Qdrant server."""

    def __init__(
        self,
        project: str = "default",
        path: str | Path | None = None,
        url: str | None = None,
        client: QdrantClient | None = None,
    ) -> None:
        if client is None:
            if url:
                client = QdrantClient(url=url)
            else:
                if path is None:
                    raise ValueError("give a Qdrant url or a local storage path")
                Path(path).mkdir(parents=True, exist_ok=True)
                client = QdrantClient(path=str(path))
        self.client = client
        self.local = type(getattr(client, "_client", None)).__name__ == "QdrantLocal"
        self.project = project
        self.collection = COLLECTION_PREFIX + "".join(c if c.isalnum() or c in "-_" else "_" for c in project)

    @classmethod
    def from_settings(cls, project: str = "default", settings: Any = None) -> SimilarityIndex:
        """The index configured by ``QDRANT_URL`` / ``QDRANT_PATH``."""
        from defect_assist.core.settings import get_settings

        settings = settings or get_settings()
        return cls(project, path=settings.qdrant_path, url=settings.qdrant_url or None)

    # ---------------------------------------------------------------- collection
    def exists(self) -> bool:
        return self.client.collection_exists(self.collection)

    def ensure_collection(self, dim: int) -> None:
        """Create the collection (cosine) unless present; a dimension change recreates it."""
        if self.exists():
            current = self.client.get_collection(self.collection).config.params.vectors
            if isinstance(current, models.VectorParams) and current.size == dim:
                return
            logger.warning("embedding dimension changed to %d: recreating %s", dim, self.collection)
            self.client.delete_collection(self.collection)
        self.client.create_collection(
            self.collection, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE)
        )
        if not self.local:  # local mode ignores payload indexes
            for key, schema in (
                ("label", models.PayloadSchemaType.KEYWORD),
                ("model_version", models.PayloadSchemaType.KEYWORD),
                ("stale", models.PayloadSchemaType.BOOL),
                ("content_hash", models.PayloadSchemaType.KEYWORD),
            ):
                self.client.create_payload_index(self.collection, key, schema)

    def count(self, stale: bool | None = None) -> int:
        if not self.exists():
            return 0
        flt = (
            None
            if stale is None
            else models.Filter(
                must=[models.FieldCondition(key="stale", match=models.MatchValue(value=stale))]
            )
        )
        return self.client.count(self.collection, count_filter=flt, exact=True).count

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> SimilarityIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- points
    def payloads(self, digests: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Stored payloads of the images with these content hashes (missing ones are left out)."""
        if not self.exists() or not digests:
            return {}
        found: dict[str, dict[str, Any]] = {}
        ids = [point_id(d) for d in digests]
        for start in range(0, len(ids), 256):
            for record in self.client.retrieve(self.collection, ids[start : start + 256], with_payload=True):
                payload = record.payload or {}
                found[payload.get("content_hash", "")] = payload
        return found

    def upsert(self, vectors: np.ndarray, payloads: Sequence[dict[str, Any]], batch_size: int = 256) -> None:
        """Insert or replace points; each payload must hold ``content_hash``."""
        vectors = np.asarray(vectors, dtype=np.float32)
        self.ensure_collection(vectors.shape[1])
        for start in range(0, len(payloads), batch_size):
            points = [
                models.PointStruct(id=point_id(p["content_hash"]), vector=v.tolist(), payload=p)
                for v, p in zip(
                    vectors[start : start + batch_size], payloads[start : start + batch_size], strict=True
                )
            ]
            self.client.upsert(self.collection, points=points, wait=True)

    def set_payload(self, digest: str, values: dict[str, Any]) -> None:
        self.client.set_payload(self.collection, payload=values, points=[point_id(digest)], wait=True)

    def mark_stale(self, model_version: str) -> int:
        """Flag points embedded by any version other than ``model_version``; returns how many are stale."""
        if not self.exists():
            return 0
        selector = models.Filter(
            must_not=[
                models.FieldCondition(key="model_version", match=models.MatchValue(value=model_version))
            ]
        )
        self.client.set_payload(self.collection, payload={"stale": True}, points=selector, wait=True)
        return self.count(stale=True)

    # ---------------------------------------------------------------- search
    def search(
        self,
        vector: np.ndarray,
        k: int = 10,
        exclude_hash: str | None = None,
        where: dict[str, Any] | None = None,
    ) -> list[Neighbour]:
        """The ``k`` nearest points (cosine), optionally excluding one image and filtering on payload."""
        if not self.exists():
            return []
        must = [
            models.FieldCondition(key=key, match=models.MatchValue(value=value))
            for key, value in (where or {}).items()
        ]
        must_not = [models.HasIdCondition(has_id=[point_id(exclude_hash)])] if exclude_hash else []
        flt = models.Filter(must=must or None, must_not=must_not or None) if (must or must_not) else None
        response = self.client.query_points(
            self.collection,
            query=np.asarray(vector, dtype=np.float32).tolist(),
            limit=k,
            query_filter=flt,
            with_payload=True,
        )
        return [Neighbour(str(p.id), float(p.score), p.payload or {}) for p in response.points]


# -------------------------------------------------------------------- building and querying
def _payload(
    record: ImageRecord, digest: str, score: float, model_version: str, ls_task_id: int | None
) -> dict[str, Any]:
    return {
        "path": str(Path(record.path).resolve()),
        "split": record.split,
        "label": record.label,
        "defect_type": record.defect_type,
        "category": record.category,
        "score": None if np.isnan(score) else round(float(score), 6),
        "is_anomalous": None if np.isnan(score) else bool(score >= 0.5),
        "ls_task_id": ls_task_id,
        "model_version": model_version,
        "embedding": EMBEDDING_NAME,
        "content_hash": digest,
        "stale": False,
        "indexed_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def update_index(
    index: SimilarityIndex,
    embedder: SimilarityEmbedder,
    records: Sequence[ImageRecord],
    model_version: str,
    ls_task_ids: dict[str, int] | None = None,
    reembed_stale: bool = True,
    batch_size: int = 16,
    progress: Callable[[str, int, int], None] | None = None,
) -> IndexReport:
    """Embed new images (by content hash) and, with ``reembed_stale``, those of other model versions.

    Images already embedded by ``model_version`` only get their path/split/label/task-id payload
    refreshed when it changed.
    """
    started = time.perf_counter()
    report = IndexReport()
    ls_task_ids = ls_task_ids or {}
    digests = [content_hash(r.path) for r in records]
    stored = index.payloads(digests)
    todo: list[int] = []
    seen: set[str] = set()
    for i, (record, digest) in enumerate(zip(records, digests, strict=True)):
        if digest in seen:
            continue  # the same bytes twice in the folder
        seen.add(digest)
        old = stored.get(digest)
        if old is None:
            todo.append(i)
            report.added += 1
        elif old.get("model_version") != model_version or old.get("stale"):
            if reembed_stale:
                todo.append(i)
                report.reembedded += 1
            else:
                report.unchanged += 1
        else:
            fresh = {
                "path": str(Path(record.path).resolve()),
                "split": record.split,
                "label": record.label,
                "defect_type": record.defect_type,
                "category": record.category,
            }
            task = ls_task_ids.get(str(record.path))
            if task is not None:
                fresh["ls_task_id"] = task
            if any(old.get(k) != v for k, v in fresh.items()):
                index.set_payload(digest, fresh)
                report.payload_updated += 1
            else:
                report.unchanged += 1
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        result = embedder.embed([records[i].path for i in chunk])
        ok = [j for j, err in enumerate(result.errors) if err is None]
        for j, err in enumerate(result.errors):
            if err is not None:
                report.failed[str(records[chunk[j]].path)] = err
        if ok:
            payloads = [
                _payload(
                    records[chunk[j]],
                    digests[chunk[j]],
                    result.scores[j],
                    model_version,
                    ls_task_ids.get(str(records[chunk[j]].path)),
                )
                for j in ok
            ]
            index.upsert(result.vectors[ok], payloads)
        if progress:
            progress("embed", min(start + batch_size, len(todo)), len(todo))
    report.total = index.count()
    report.seconds = time.perf_counter() - started
    return report


def query_similar(
    index: SimilarityIndex,
    embedder: SimilarityEmbedder,
    image: str | Path,
    k: int = 10,
    exclude_self: bool = True,
) -> tuple[dict[str, Any], list[Neighbour]]:
    """Embed ``image`` with the current model and return (its own verdict, its ``k`` nearest neighbours)."""
    result = embedder.embed([image])
    if result.errors[0] is not None:
        raise ValueError(result.errors[0])
    digest = content_hash(image) if exclude_self and Path(image).is_file() else None
    neighbours = index.search(result.vectors[0], k=k, exclude_hash=digest)
    score = float(result.scores[0])
    return {"path": str(image), "score": round(score, 6), "is_anomalous": bool(score >= 0.5)}, neighbours

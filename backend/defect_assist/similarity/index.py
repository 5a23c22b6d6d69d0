"""The project's image embeddings in one Qdrant collection: points, payloads, stale flags, search.

**One index per project**, shared by ``defect-assist index`` / ``similar``, the backend's ``/similar``
route, ``defect-assist fiftyone`` and the FiftyOne plugin (whose ``similarity`` brain run reads this
same collection, see :mod:`defect_assist.explore.qdrant_backend`): the collection
``defect_assist_<project>``, cosine distance, one vector per image, in a Qdrant server when
``QDRANT_URL`` is set, else in embedded storage (qdrant-client local mode) under ``QDRANT_PATH``.

Embedded storage admits one process at a time: :class:`SimilarityIndex` opens it **per operation**
through :class:`~defect_assist.similarity.local_storage.LocalStorage` (waiting for another holder,
then raising :class:`~defect_assist.similarity.local_storage.IndexBusyError`), and
:meth:`SimilarityIndex.session` groups several operations under one opening.

Point ids are derived from the SHA-256 of the image bytes (:func:`point_id` of
:func:`~defect_assist.similarity.indexing.content_hash`), so re-indexing a folder only embeds images
whose content is new (a moved/renamed file only gets its payload updated), whichever command embedded
them first. Each point's payload: ``path, split, label, defect_type, category, score, is_anomalous,
ls_task_id, model_version, embedding, content_hash, stale, indexed_at``. Building and querying
(:func:`~defect_assist.similarity.indexing.update_index`,
:func:`~defect_assist.similarity.indexing.query_similar`) live in :mod:`defect_assist.similarity.indexing`.

New model version policy: :meth:`SimilarityIndex.mark_stale` flags every point embedded by another
version (``stale: true``, one filtered payload update, no re-embedding, so a retrain stays fast);
stale points stay searchable and are reported as stale. The next ``defect-assist index`` (or
``defect-assist fiftyone``, the FiftyOne "refresh predictions" operator, or ``update_index`` with
``reembed_stale=True``) re-embeds them with the current version and clears the flag.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

# Re-exported for callers that still import them from here (explore.fiftyone_dataset, the FiftyOne
# plugin, tests/test_efficientad.py): they live in .indexing; drop this import once those callers move.
from defect_assist.similarity.local_storage import LOCK_WAIT_S, LocalStorage

logger = logging.getLogger(__name__)

COLLECTION_PREFIX = "defect_assist_"
PAYLOAD_FIELDS = ("path", "split", "label", "defect_type", "score", "ls_task_id", "model_version")


def point_id(digest: str) -> str:
    """The Qdrant point id (a UUID) of an image with content hash ``digest``."""
    return str(uuid.UUID(digest[:32]))


def collection_name(project: str) -> str:
    """The collection of ``project``'s similarity index."""
    return COLLECTION_PREFIX + "".join(c if c.isalnum() or c in "-_" else "_" for c in project)


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


class SimilarityIndex:
    """One project's collection in embedded Qdrant storage (opened per operation) or on a Qdrant server."""

    def __init__(
        self,
        project: str = "default",
        path: str | Path | None = None,
        url: str | None = None,
        client: QdrantClient | None = None,
        lock_wait_s: float = LOCK_WAIT_S,
    ) -> None:
        self.url = url or None
        self.path: Path | None = None
        self._storage: LocalStorage | None = None
        if client is None and self.url:
            client = QdrantClient(url=self.url)
        if client is None:
            if path is None:
                raise ValueError("give a Qdrant url or a local storage path")
            self._storage = LocalStorage.at(path)
            self.path = self._storage.path
        self._client = client
        self.local = self._storage is not None or (
            type(getattr(client, "_client", None)).__name__ == "QdrantLocal"
        )
        self.lock_wait_s = lock_wait_s
        self.project = project
        self.collection = collection_name(project)

    @classmethod
    def from_settings(cls, project: str = "default", settings: Any = None) -> SimilarityIndex:
        """The index configured by ``QDRANT_URL`` / ``QDRANT_PATH``."""
        from defect_assist.core.settings import get_settings

        settings = settings or get_settings()
        return cls(project, path=settings.qdrant_path, url=settings.qdrant_url or None)

    @contextmanager
    def session(self) -> Iterator[QdrantClient]:
        """The client for one or more operations: embedded storage is opened (waiting for another holder
        up to ``lock_wait_s``) and closed again at the end; nested sessions share one opening."""
        if self._storage is None:
            assert self._client is not None
            yield self._client
            return
        with self._storage.open(self.lock_wait_s) as client:
            yield client

    # ---------------------------------------------------------------- collection
    def exists(self) -> bool:
        with self.session() as client:
            return client.collection_exists(self.collection)

    def ensure_collection(self, dim: int) -> None:
        """Create the collection (cosine) unless present; a dimension change recreates it."""
        with self.session() as client:
            if client.collection_exists(self.collection):
                current = client.get_collection(self.collection).config.params.vectors
                if isinstance(current, models.VectorParams) and current.size == dim:
                    return
                logger.warning("embedding dimension changed to %d: recreating %s", dim, self.collection)
                client.delete_collection(self.collection)
            client.create_collection(
                self.collection, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE)
            )
            if not self.local:  # local mode ignores payload indexes
                for key, schema in (
                    ("label", models.PayloadSchemaType.KEYWORD),
                    ("model_version", models.PayloadSchemaType.KEYWORD),
                    ("stale", models.PayloadSchemaType.BOOL),
                    ("content_hash", models.PayloadSchemaType.KEYWORD),
                ):
                    client.create_payload_index(self.collection, key, schema)

    def count(self, stale: bool | None = None) -> int:
        with self.session() as client:
            if not client.collection_exists(self.collection):
                return 0
            flt = (
                None
                if stale is None
                else models.Filter(
                    must=[models.FieldCondition(key="stale", match=models.MatchValue(value=stale))]
                )
            )
            return client.count(self.collection, count_filter=flt, exact=True).count

    def close(self) -> None:
        """Close a server connection (embedded storage is already closed between operations)."""
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> SimilarityIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- points
    def _retrieve(self, digests: Sequence[str], with_vectors: bool) -> list[models.Record]:
        records: list[models.Record] = []
        with self.session() as client:
            if not digests or not client.collection_exists(self.collection):
                return records
            ids = [point_id(d) for d in digests]
            for start in range(0, len(ids), 256):
                records += client.retrieve(
                    self.collection, ids[start : start + 256], with_payload=True, with_vectors=with_vectors
                )
        return records

    def payloads(self, digests: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Stored payloads of the images with these content hashes (missing ones are left out)."""
        found: dict[str, dict[str, Any]] = {}
        for record in self._retrieve(digests, with_vectors=False):
            payload = record.payload or {}
            found[payload.get("content_hash", "")] = payload
        return found

    def vectors(self, digests: Sequence[str]) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        """Stored ``(vector, payload)`` of the images with these content hashes (missing ones left out)."""
        found: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
        for record in self._retrieve(digests, with_vectors=True):
            payload = record.payload or {}
            vector = record.vector
            if isinstance(vector, list):
                found[payload.get("content_hash", "")] = (np.asarray(vector, dtype=np.float32), payload)
        return found

    def upsert(self, vectors: np.ndarray, payloads: Sequence[dict[str, Any]], batch_size: int = 256) -> None:
        """Insert or replace points; each payload must hold ``content_hash``."""
        vectors = np.asarray(vectors, dtype=np.float32)
        with self.session() as client:
            self.ensure_collection(vectors.shape[1])
            for start in range(0, len(payloads), batch_size):
                points = [
                    models.PointStruct(id=point_id(p["content_hash"]), vector=v.tolist(), payload=p)
                    for v, p in zip(
                        vectors[start : start + batch_size], payloads[start : start + batch_size], strict=True
                    )
                ]
                client.upsert(self.collection, points=points, wait=True)

    def set_payload(self, digest: str, values: dict[str, Any]) -> None:
        with self.session() as client:
            client.set_payload(self.collection, payload=values, points=[point_id(digest)], wait=True)

    def mark_stale(self, model_version: str) -> int:
        """Flag points embedded by any version other than ``model_version``; returns how many are stale."""
        with self.session() as client:
            if not client.collection_exists(self.collection):
                return 0
            selector = models.Filter(
                must_not=[
                    models.FieldCondition(key="model_version", match=models.MatchValue(value=model_version))
                ]
            )
            client.set_payload(self.collection, payload={"stale": True}, points=selector, wait=True)
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
        must = [
            models.FieldCondition(key=key, match=models.MatchValue(value=value))
            for key, value in (where or {}).items()
        ]
        must_not = [models.HasIdCondition(has_id=[point_id(exclude_hash)])] if exclude_hash else []
        flt = models.Filter(must=must or None, must_not=must_not or None) if (must or must_not) else None
        with self.session() as client:
            if not client.collection_exists(self.collection):
                return []
            response = client.query_points(
                self.collection,
                query=np.asarray(vector, dtype=np.float32).tolist(),
                limit=k,
                query_filter=flt,
                with_payload=True,
            )
        return [Neighbour(str(p.id), float(p.score), p.payload or {}) for p in response.points]

"""A FiftyOne brain similarity backend on Qdrant that works with current qdrant-client.

fiftyone-brain 0.25's ``qdrant`` backend only connects to a server ``url`` and calls
``QdrantClient.search`` (removed in qdrant-client 1.16) and the deprecated ``recreate_collection``.
This backend (``qdrant_local``) reuses it with a client adapter mapping those two calls onto
``query_points`` and ``delete_collection`` + ``create_collection``, and adds ``path``: embedded
Qdrant storage on disk. Local storage is locked by one process at a time, so in local mode the
client is opened per operation and closed again; that lets the App server and the CLI or plugin
take turns on the same folder.

Register it with :func:`register_backend` (done on import of ``defect_assist.explore``'s dataset
builder); the App's server process finds it through the brain run's stored config class.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fiftyone.brain.internal.core.qdrant import (
    QdrantSimilarity,
    QdrantSimilarityConfig,
    QdrantSimilarityIndex,
)
from qdrant_client import QdrantClient, models

BACKEND_NAME = "qdrant_local"
CONFIG_CLS = f"{__name__}.QdrantLocalSimilarityConfig"


class CompatClient:
    """A ``QdrantClient`` stand-in offering the methods fiftyone-brain calls, on the current API."""

    def __init__(self, path: str | None = None, url: str | None = None, **kwargs: Any) -> None:
        self._path = path
        self._url = url
        self._kwargs = kwargs
        self._client: QdrantClient | None = None if path else QdrantClient(url=url, **kwargs)

    @contextmanager
    def _open(self) -> Iterator[QdrantClient]:
        if self._client is not None:
            yield self._client
            return
        assert self._path is not None
        Path(self._path).mkdir(parents=True, exist_ok=True)
        client = QdrantClient(path=self._path)
        try:
            yield client
        finally:
            client.close()

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            with self._open() as client:
                return getattr(client, name)(*args, **kwargs)

        return call

    def recreate_collection(
        self, collection_name: str, vectors_config: models.VectorParams, **kwargs: Any
    ) -> bool:
        options = {k: v for k, v in kwargs.items() if v is not None}
        with self._open() as client:
            if client.collection_exists(collection_name):
                client.delete_collection(collection_name)
            return client.create_collection(collection_name, vectors_config=vectors_config, **options)

    def search(
        self,
        collection_name: str,
        query_vector: Any,
        query_filter: Any = None,
        with_payload: bool = True,
        limit: int = 10,
        **kwargs: Any,
    ) -> list[models.ScoredPoint]:
        query = query_vector.tolist() if hasattr(query_vector, "tolist") else list(query_vector)
        with self._open() as client:
            return client.query_points(
                collection_name,
                query=query,
                query_filter=query_filter,
                with_payload=with_payload,
                limit=limit,
                **kwargs,
            ).points

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class QdrantLocalSimilarityConfig(QdrantSimilarityConfig):
    """Like the brain's Qdrant config, plus ``path``: embedded storage (used when ``url`` is not set)."""

    def __init__(self, path: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = str(path) if path else None

    @property
    def method(self) -> str:
        return BACKEND_NAME


class QdrantLocalSimilarity(QdrantSimilarity):
    """The backend: builds :class:`QdrantLocalSimilarityIndex` objects."""

    def initialize(self, samples: Any, brain_key: str) -> QdrantLocalSimilarityIndex:
        return QdrantLocalSimilarityIndex(samples, self.config, brain_key, backend=self)


class QdrantLocalSimilarityIndex(QdrantSimilarityIndex):
    """The brain's Qdrant index on a :class:`CompatClient` (server or embedded storage)."""

    def _initialize(self) -> None:
        if self.config.url:
            self._client = CompatClient(url=self.config.url, api_key=self.config.api_key)
        else:
            if not self.config.path:
                raise ValueError("qdrant_local needs a storage `path` or a server `url`")
            self._client = CompatClient(path=self.config.path)
        if self.config.collection_name is None:
            import fiftyone.core.utils as fou

            self.config.collection_name = "fiftyone-" + fou.to_slug(self.samples._root_dataset.name)
            self.save_config()

    def _create_collection(self, dimension: int) -> None:
        self._client.recreate_collection(
            self.config.collection_name,
            vectors_config=models.VectorParams(size=dimension, distance=models.Distance.COSINE),
        )


def register_backend() -> None:
    """Make ``compute_similarity(..., backend="qdrant_local")`` available in this process."""
    import fiftyone.brain as fob

    fob.brain_config.similarity_backends.setdefault(BACKEND_NAME, {})["config_cls"] = CONFIG_CLS

"""A FiftyOne brain similarity backend on Qdrant that reads the project's own similarity index.

fiftyone-brain 0.25's ``qdrant`` backend only connects to a server ``url`` and calls
``QdrantClient.search`` (removed in qdrant-client 1.16) and the deprecated ``recreate_collection``.
This backend (``qdrant_local``) reuses it with a client adapter mapping those two calls onto
``query_points`` and ``delete_collection`` + ``create_collection``, and adds ``path``: embedded
Qdrant storage on disk, opened per operation through
:class:`~defect_assist.similarity.local_storage.LocalStorage` (the same opener and locking rule
as :class:`~defect_assist.similarity.index.SimilarityIndex`), so the App server, the CLI, the backend
and the plugin take turns on one folder.

With ``hash_field`` set (what ``defect-assist fiftyone`` builds) the brain run has no collection of
its own: it is a view of the project's similarity index ``defect_assist_<project>``. A sample maps to
the point of its content hash (the sample field ``hash_field``), searches are restricted to the
dataset's (or view's) points, and the brain run never writes or deletes points: ``cleanup`` (run when
the brain run is replaced) leaves the shared index alone, and ``add_to_index`` / ``remove_from_index``
refuse (the index is written by :func:`~defect_assist.similarity.indexing.update_index`).

Register it with :func:`register_backend` (done on import of ``defect_assist.explore``'s dataset
builder); the App's server process finds it through the brain run's stored config class.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from fiftyone.brain.internal.core.qdrant import (
    QdrantSimilarity,
    QdrantSimilarityConfig,
    QdrantSimilarityIndex,
)
from qdrant_client import QdrantClient, models

from defect_assist.similarity.index import point_id
from defect_assist.similarity.local_storage import LocalStorage

logger = logging.getLogger(__name__)

BACKEND_NAME = "qdrant_local"
CONFIG_CLS = f"{__name__}.QdrantLocalSimilarityConfig"


class CompatClient:
    """A ``QdrantClient`` stand-in offering the methods fiftyone-brain calls, on the current API."""

    def __init__(self, path: str | None = None, url: str | None = None, **kwargs: Any) -> None:
        self._storage = LocalStorage.at(path) if path else None
        self._client: QdrantClient | None = None if path else QdrantClient(url=url, **kwargs)

    @contextmanager
    def _open(self) -> Iterator[QdrantClient]:
        if self._client is not None:
            yield self._client
            return
        assert self._storage is not None
        with self._storage.open() as client:
            yield client

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
    """Like the brain's Qdrant config, plus ``path`` (embedded storage, used when ``url`` is not set) and
    ``hash_field`` (the sample field holding the content hash: a view of the project's index)."""

    def __init__(self, path: str | None = None, hash_field: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = str(path) if path else None
        self.hash_field = hash_field

    @property
    def method(self) -> str:
        return BACKEND_NAME


class QdrantLocalSimilarity(QdrantSimilarity):
    """The backend: builds :class:`QdrantLocalSimilarityIndex` objects."""

    def initialize(self, samples: Any, brain_key: str) -> QdrantLocalSimilarityIndex:
        return QdrantLocalSimilarityIndex(samples, self.config, brain_key, backend=self)


class ReadOnlyIndexError(ValueError):
    """The brain run is a view of the project's similarity index, which only ``update_index`` writes."""


class QdrantLocalSimilarityIndex(QdrantSimilarityIndex):
    """The brain's Qdrant index on a :class:`CompatClient` (server or embedded storage)."""

    def _initialize(self) -> None:
        self._maps: tuple[dict[str, str], dict[str, str]] | None = None
        url, path = self.config.url, self.config.path
        if self.shares_project_index and not url and not path:
            from defect_assist.core.settings import get_settings

            settings = get_settings()
            url, path = settings.qdrant_url or None, str(settings.qdrant_path)
        if url:
            self._client = CompatClient(url=url, api_key=self.config.api_key)
        else:
            if not path:
                raise ValueError("qdrant_local needs a storage `path` or a server `url`")
            self._client = CompatClient(path=path)
        if self.config.collection_name is None:
            import fiftyone.core.utils as fou

            self.config.collection_name = "fiftyone-" + fou.to_slug(self.samples._root_dataset.name)
            self.save_config()

    @property
    def shares_project_index(self) -> bool:
        """Whether this brain run is a view of the project's similarity index (``hash_field`` set)."""
        return bool(getattr(self.config, "hash_field", None))

    def _create_collection(self, dimension: int) -> None:
        self._client.recreate_collection(
            self.config.collection_name,
            vectors_config=models.VectorParams(size=dimension, distance=models.Distance.COSINE),
        )

    # ------------------------------------------------------------ the project index's point ids
    def _id_maps(self) -> tuple[dict[str, str], dict[str, str]]:
        """(sample id → point id, point id → sample id) from the dataset's content hashes."""
        if getattr(self, "_maps", None) is None:
            ids, hashes = self._samples._root_dataset.values(["id", self.config.hash_field])
            to_point = {sid: point_id(h) for sid, h in zip(ids, hashes, strict=True) if h}
            to_sample: dict[str, str] = {}
            for sid, pid in to_point.items():
                to_sample.setdefault(pid, sid)  # byte-identical samples share one point
            self._maps = (to_point, to_sample)
        assert self._maps is not None
        return self._maps

    def reload(self) -> None:
        self._maps = None
        super().reload()

    @property
    def has_view(self) -> bool:
        # the project index may hold images outside this dataset: always search the view's points only
        return True if self.shares_project_index else super().has_view

    def _to_qdrant_id(self, _id: str) -> str:
        if not self.shares_project_index:
            return super()._to_qdrant_id(_id)
        return self._id_maps()[0][str(_id)]

    def _to_qdrant_ids(self, ids: Iterable[str]) -> list[str]:
        if not self.shares_project_index:
            return super()._to_qdrant_ids(ids)
        to_point = self._id_maps()[0]
        return [to_point[str(i)] for i in ids if str(i) in to_point]

    def _to_fiftyone_id(self, qid: Any) -> str:
        if not self.shares_project_index:
            return super()._to_fiftyone_id(qid)
        return self._id_maps()[1][str(qid)]

    def _to_fiftyone_ids(self, qids: Iterable[Any]) -> list[str]:
        if not self.shares_project_index:
            return super()._to_fiftyone_ids(qids)
        to_sample = self._id_maps()[1]
        return [to_sample[str(q)] for q in qids if str(q) in to_sample]

    def _get_index_ids(self, batch_size: int = 1000) -> list[str]:
        if not self.shares_project_index:
            return super()._get_index_ids(batch_size)
        to_sample = self._id_maps()[1]
        if not self._client.collection_exists(self.config.collection_name):
            return []
        points = list(to_sample)
        found: list[str] = []
        for start in range(0, len(points), batch_size):
            records = self._client.retrieve(
                self.config.collection_name,
                points[start : start + batch_size],
                with_payload=False,
                with_vectors=False,
            )
            found += [to_sample[str(r.id)] for r in records]
        return found

    @property
    def total_index_size(self) -> int:
        if not self.shares_project_index:
            return super().total_index_size
        return len(self._get_index_ids())

    def add_to_index(self, embeddings: Any, sample_ids: Any, *args: Any, **kwargs: Any) -> None:
        if self.shares_project_index:
            raise ReadOnlyIndexError(
                f"{self.config.collection_name} is the project's similarity index: it is written by "
                "`defect-assist index`, `defect-assist fiftyone` or the compute_predictions operator"
            )
        super().add_to_index(embeddings, sample_ids, *args, **kwargs)

    def remove_from_index(self, *args: Any, **kwargs: Any) -> None:
        if self.shares_project_index:
            raise ReadOnlyIndexError(f"{self.config.collection_name} is the project's similarity index")
        super().remove_from_index(*args, **kwargs)

    def cleanup(self) -> None:
        if self.shares_project_index:  # the shared index outlives any dataset's brain run
            logger.debug("brain run on %s removed; the index stays", self.config.collection_name)
            return
        super().cleanup()


def register_backend() -> None:
    """Make ``compute_similarity(..., backend="qdrant_local")`` available in this process."""
    import fiftyone.brain as fob

    fob.brain_config.similarity_backends.setdefault(BACKEND_NAME, {})["config_cls"] = CONFIG_CLS

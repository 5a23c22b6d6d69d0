"""Building and querying the similarity index: embed what is new, refresh payloads, find neighbours.

:func:`update_index` embeds the images whose content (:func:`content_hash`, the SHA-256 of the
bytes) the index does not hold yet, or holds from another model version (``reembed_stale``); an
image already embedded by the current version only gets its path/split/label/task-id payload
refreshed, so re-indexing a folder or moving a file costs no model run. New vectors are written in
batches, every :data:`FLUSH_POINTS` points or :data:`FLUSH_SECONDS`, and embedded storage is not held
while embedding. :func:`query_similar` gives an image's own verdict and its nearest neighbours,
reusing the stored vector when the current model version embedded it.

The collection itself (point ids, payload fields, search) is
:class:`~defect_assist.similarity.index.SimilarityIndex`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from defect_assist.similarity.embedding import EMBEDDING_NAME, WEIGHTS, EmbedResult, SimilarityEmbedder
from defect_assist.similarity.mvtec import ImageRecord

if TYPE_CHECKING:  # annotations only (index.py still re-exports update_index & co: no runtime cycle)
    from defect_assist.similarity.index import Neighbour, SimilarityIndex

FLUSH_POINTS = 256  # update_index writes its new vectors in batches of this many …
FLUSH_SECONDS = 60.0  # … or at least this often


def content_hash(path: str | Path) -> str:
    """SHA-256 of the file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class IndexReport:
    """What an index update did (``added + reembedded`` images were embedded)."""

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


def point_payload(
    record: ImageRecord, digest: str, score: float, model_version: str, ls_task_id: int | None
) -> dict[str, Any]:
    """The payload of a freshly embedded image's point (see :mod:`~defect_assist.similarity.index`)."""
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
    digests: Sequence[str] | None = None,
    on_embedded: Callable[[list[int], EmbedResult], None] | None = None,
) -> IndexReport:
    """Embed new images (by content hash) and, with ``reembed_stale``, those of other model versions.

    Images already embedded by ``model_version`` only get their path/split/label/task-id payload
    refreshed when it changed. ``digests`` are the records' content hashes when the caller has them;
    ``on_embedded(record_indices, result)`` sees each embedded batch, with full predictions (the
    FiftyOne dataset builder stores them, so an image is run through the model once). New vectors are
    written every :data:`FLUSH_POINTS` points or :data:`FLUSH_SECONDS`, the storage is not held meanwhile.
    """
    started = time.perf_counter()
    report = IndexReport()
    ls_task_ids = ls_task_ids or {}
    digests = list(digests) if digests is not None else [content_hash(r.path) for r in records]
    todo: list[int] = []
    seen: set[str] = set()
    with index.session():
        stored = index.payloads(digests)
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
    pending_vectors: list[np.ndarray] = []
    pending: list[dict[str, Any]] = []
    flushed = time.monotonic()

    def flush() -> None:
        nonlocal flushed
        if pending:
            index.upsert(np.stack(pending_vectors), pending)
            pending_vectors.clear()
            pending.clear()
        flushed = time.monotonic()

    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        result = embedder.embed([records[i].path for i in chunk], keep_predictions=on_embedded is not None)
        if on_embedded is not None:
            on_embedded(chunk, result)
        for j, err in enumerate(result.errors):
            i = chunk[j]
            if err is not None:
                report.failed[str(records[i].path)] = err
                continue
            pending_vectors.append(result.vectors[j])
            pending.append(
                point_payload(
                    records[i],
                    digests[i],
                    result.scores[j],
                    model_version,
                    ls_task_ids.get(str(records[i].path)),
                )
            )
        if len(pending) >= FLUSH_POINTS or time.monotonic() - flushed >= FLUSH_SECONDS:
            flush()
        if progress:
            progress("embed", min(start + batch_size, len(todo)), len(todo))
    with index.session():
        flush()
        report.total = index.count()
    report.seconds = time.perf_counter() - started
    return report


def stored_vector(
    index: SimilarityIndex, embedder: SimilarityEmbedder, digest: str
) -> tuple[np.ndarray, float] | None:
    """The indexed ``(vector, score)`` of an image when the embedder's own model version embedded it."""
    if not embedder.model_version or embedder.weights != WEIGHTS:
        return None
    found = index.vectors([digest]).get(digest)
    if found is None:
        return None
    vector, payload = found
    current = (
        payload.get("model_version") == embedder.model_version
        and not payload.get("stale")
        and payload.get("embedding") == EMBEDDING_NAME
        and payload.get("score") is not None
    )
    return (vector, float(payload["score"])) if current else None


def query_similar(
    index: SimilarityIndex,
    embedder: SimilarityEmbedder,
    image: str | Path,
    k: int = 10,
    exclude_self: bool = True,
) -> tuple[dict[str, Any], list[Neighbour]]:
    """``image``'s own verdict and its ``k`` nearest neighbours.

    An image the index holds, embedded by the embedder's model version, is not embedded again: its
    stored vector and score are used. Others are embedded with the current model.
    """
    digest = content_hash(image) if Path(image).is_file() else None
    exclude = digest if exclude_self else None

    def verdict(score: float) -> dict[str, Any]:
        return {"path": str(image), "score": round(score, 6), "is_anomalous": bool(score >= 0.5)}

    if digest:
        with index.session():  # one opening of embedded storage for lookup and search
            known = stored_vector(index, embedder, digest)
            if known is not None:
                return verdict(known[1]), index.search(known[0], k=k, exclude_hash=exclude)
    result = embedder.embed([image])  # (the storage is not held while embedding)
    if result.errors[0] is not None:
        raise ValueError(result.errors[0])
    return verdict(float(result.scores[0])), index.search(result.vectors[0], k=k, exclude_hash=exclude)

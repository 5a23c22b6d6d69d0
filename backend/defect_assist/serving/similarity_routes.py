"""HTTP endpoint for similarity search: a FastAPI router the backend app includes.

``POST /similar`` with a multipart image upload (field ``image``) or ``GET /similar?path=...`` (an
image file visible to the server); query parameters ``project`` and ``k``. Returns the query's
score/verdict and its neighbours (similarity, path, split, label, defect type, score, LS task id,
model version, stale flag). 404 for an unknown project or an empty index, 422 for an unreadable image,
503 (``Retry-After``) while another process holds the index's embedded storage.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, HTTPException, Query, UploadFile
from fastapi.concurrency import run_in_threadpool

from defect_assist.similarity.indexing import query_similar
from defect_assist.similarity.local_storage import IndexBusyError

router = APIRouter(tags=["similarity"])
_lock = threading.Lock()  # one request at a time: each loads the model and opens the index
RETRY_AFTER_S = 5  # told to a client whose request found the embedded storage held by another process


def _search(image: Path, project: str, k: int, exclude_self: bool = True) -> dict[str, Any]:
    from defect_assist.core.store import StoreError
    from defect_assist.similarity.service import open_context

    with _lock:
        try:
            context = open_context(project)
        except StoreError as error:
            raise HTTPException(404, str(error)) from error
        try:
            with context.index.session():  # embedded storage opened once for the count and the query
                if not context.index.count():
                    raise HTTPException(404, f"the similarity index of project {project!r} is empty")
                try:
                    query, neighbours = query_similar(
                        context.index, context.embedder, image, k=k, exclude_self=exclude_self
                    )
                except ValueError as error:
                    raise HTTPException(422, str(error)) from error
        except IndexBusyError as error:
            raise HTTPException(503, str(error), headers={"Retry-After": str(RETRY_AFTER_S)}) from error
        finally:
            context.close()
    return {
        "query": query,
        "model_version": context.model_version,
        "neighbours": [n.summary() for n in neighbours],
    }


@router.post("/similar")
async def similar_upload(
    image: Annotated[UploadFile, File(description="Query image.")],
    project: Annotated[str, Query()] = "default",
    k: Annotated[int, Query(ge=1, le=1000)] = 10,
) -> dict[str, Any]:
    """Nearest neighbours of an uploaded image (an indexed copy of it is returned as the first hit)."""
    data = await image.read()
    suffix = Path(image.filename or "query.png").suffix or ".png"
    with tempfile.NamedTemporaryFile(suffix=suffix) as handle:
        handle.write(data)
        handle.flush()
        result = await run_in_threadpool(_search, Path(handle.name), project, k, False)
    result["query"]["path"] = image.filename
    return result


@router.get("/similar")
async def similar_path(
    path: Annotated[str, Query(description="Image file on the server.")],
    project: Annotated[str, Query()] = "default",
    k: Annotated[int, Query(ge=1, le=1000)] = 10,
) -> dict[str, Any]:
    """Nearest neighbours of an image file the server can read (the image itself is excluded)."""
    if not Path(path).is_file():
        raise HTTPException(404, f"no such image: {path}")
    return await run_in_threadpool(_search, Path(path), project, k)

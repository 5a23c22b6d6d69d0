"""HTTP endpoint for similarity search: a FastAPI router the backend app includes.

``POST /similar`` with a multipart image upload (field ``image``) or ``GET /similar?path=...`` (an
image file under an allowed local root, the rule of task images: label_studio.image_sources; any other
path answers the same 404 as a missing one, so nothing tells whether a server file exists); query
parameters ``project`` and ``k``. Returns the query's
score/verdict and its neighbours (similarity, path, split, label, defect type, score, LS task id,
model version, stale flag). 404 for an unknown project or an empty index, 422 for an unreadable image,
503 (``Retry-After``) while another process holds the index's embedded storage.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool

from defect_assist.core.images import ImageLoadError, image_size
from defect_assist.label_studio.image_sources import ImageFetchError, ImageRefused
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
    request: Request,
    image: Annotated[UploadFile, File(description="Query image.")],
    project: Annotated[str, Query()] = "default",
    k: Annotated[int, Query(ge=1, le=1000)] = 10,
) -> dict[str, Any]:
    """Nearest neighbours of an uploaded image (an indexed copy of it is returned as the first hit)."""
    data = await image.read()  # the body is bounded by MAX_REQUEST_BYTES (serving.limits)
    _check_pixels(request, data)
    suffix = Path(image.filename or "query.png").suffix or ".png"
    with tempfile.NamedTemporaryFile(suffix=suffix) as handle:
        handle.write(data)
        handle.flush()
        result = await run_in_threadpool(_search, Path(handle.name), project, k, False)
    result["query"]["path"] = image.filename
    return result


@router.get("/similar")
async def similar_path(
    request: Request,
    path: Annotated[str, Query(description="Image file under an allowed local root.")],
    project: Annotated[str, Query()] = "default",
    k: Annotated[int, Query(ge=1, le=1000)] = 10,
) -> dict[str, Any]:
    """Nearest neighbours of an image file under an allowed local root (the image itself is excluded)."""
    sources = getattr(request.app.state, "image_sources", None)
    missing = HTTPException(404, f"no such image: {path[:200]}")
    if sources is None:
        raise missing
    try:
        local = sources.local_path(path)
        if local is None:
            raise missing  # a URL: not read here
        data = await run_in_threadpool(sources.local.read, local, sources.max_bytes)
    except (ImageRefused, ImageFetchError):
        raise missing from None  # refused and missing answer alike
    _check_pixels(request, data)
    return await run_in_threadpool(_search, local, project, k)


def _check_pixels(request: Request, data: bytes) -> None:
    limits = getattr(request.app.state, "limits", None)
    try:
        image_size(data, limits.max_image_pixels if limits is not None else None)
    except ImageLoadError as error:
        raise HTTPException(422, str(error)) from None

"""``defect-assist serve``: the Label Studio ML backend, with the worker and similarity search wired in.

The serving package never imports the worker: this command hands the worker's webhook trigger and
its ``/retrain``, ``/jobs`` routes to :func:`~defect_assist.serving.app.create_app`, and mounts
``/similar`` when the similarity extra (qdrant-client) is installed.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING, Annotated, Any

import typer

from defect_assist.core.settings import Settings

if TYPE_CHECKING:
    from fastapi import APIRouter, FastAPI

logger = logging.getLogger(__name__)


def has_extra(module: str) -> bool:
    """Whether a third-party module of an optional extra is installed."""
    return importlib.util.find_spec(module) is not None


def backend_app(settings: Settings | None = None) -> FastAPI:
    """The ML backend app with every installed part: retraining (rq) and similarity (qdrant-client)."""
    from defect_assist.serving.app import create_app  # fastapi: the server extra

    routers: list[APIRouter] = []
    handler: Any = None
    if has_extra("rq"):
        from defect_assist_worker.routes import router as retrain_router
        from defect_assist_worker.triggers import handle_webhook_event

        routers.append(retrain_router)
        handler = handle_webhook_event
    else:
        logger.warning("rq not installed (worker extra): webhooks are counted, retraining is not served")
    if has_extra("qdrant_client"):
        from defect_assist.serving.similarity_routes import router as similarity_router

        routers.append(similarity_router)
    else:
        logger.info("qdrant-client not installed (explore extra): /similar not served")
    return create_app(settings, webhook_handler=handler, routers=routers)


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port (9090 is the Label Studio ML backend convention).")] = 9090,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the Label Studio ML backend (/health /setup /predict /webhook /versions) from MODEL_DIR."""
    import uvicorn

    uvicorn.run(backend_app(), host=host, port=port, log_level=log_level)

"""``defect-assist serve``: the Label Studio ML backend, with the worker and similarity search wired in.

The serving package never imports the worker: this command hands the worker's webhook trigger and
its ``/retrain``, ``/jobs`` routes to :func:`~defect_assist.serving.app.create_app`, and mounts
``/similar`` when the similarity extra (qdrant-client) is installed.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from defect_assist.core.settings import Settings, get_settings

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


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: may be any interface


def exposure_warning(host: str, settings: Settings) -> str | None:
    """What is wrong with listening on ``host`` with these settings (None: loopback or auth on)."""
    if is_loopback(host) or settings.basic_auth_user:
        return None
    where = "every interface" if host in ("0.0.0.0", "::", "") else f"address {host}"
    return (
        f"WARNING: serving on {where} ({host}) WITHOUT basic auth: anyone who can reach this port can "
        "call /predict, /setup and /webhook (start retrains, read predictions, make this host fetch "
        "image URLs). Set BASIC_AUTH_USER and BASIC_AUTH_PASS (and the same credentials in Label "
        "Studio's ML connection), or bind 127.0.0.1."
    )


def serve(
    host: Annotated[
        str, typer.Option(help="Interface to listen on (0.0.0.0: every one; set BASIC_AUTH_* then).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (9090 is the Label Studio ML backend convention).")] = 9090,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the Label Studio ML backend (/health /setup /predict /webhook /versions) from MODEL_DIR."""
    import uvicorn

    settings = get_settings()
    warning = exposure_warning(host, settings)
    if warning:
        logger.warning("%s", warning)
        print(f"\n{'!' * 100}\n{warning}\n{'!' * 100}\n", file=sys.stderr, flush=True)
    uvicorn.run(backend_app(settings), host=host, port=port, log_level=log_level)

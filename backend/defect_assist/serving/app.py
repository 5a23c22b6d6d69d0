"""FastAPI app speaking the Label Studio 1.23 ML backend protocol.

``GET /health``, ``POST /setup``, ``POST /predict``, ``POST /webhook``, ``GET /versions``; optional
HTTP basic auth (``BASIC_AUTH_USER``/``BASIC_AUTH_PASS``) on every route, ``/docs`` and
``/openapi.json`` included: Label Studio sends the credentials of the ML connection with each call.
Auth is checked from the headers before the body is read, the body is read up to
``MAX_REQUEST_BYTES`` before it is parsed (serving.limits), and a body of the wrong shape is a 400
(serving.payloads); what each bad input does is listed in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.routing import NoMatchFound

from defect_assist.core.settings import Settings, get_settings
from defect_assist.core.store import ModelStore
from defect_assist.label_studio.client import LabelStudioClient, project_id
from defect_assist.label_studio.image_sources import ImageSources
from defect_assist.label_studio.label_config import LabelConfigError
from defect_assist.serving.label_studio_sync import LabelStudioSync
from defect_assist.serving.limits import GuardMiddleware, ServingLimits
from defect_assist.serving.model import DefectModel, WebhookHandler
from defect_assist.serving.payloads import (
    PayloadError,
    parse_json,
    predict_request,
    setup_request,
    webhook_request,
)

logger = logging.getLogger(__name__)


def _accepted(request: Request, action: str, answer: dict[str, Any] | None) -> dict[str, Any]:
    """The webhook's answer; for a retrain: the job id as ``job`` (LS records it) and a progress URL."""
    accepted: dict[str, Any] = {"status": "accepted", "action": action}
    if answer and answer.get("job_id"):
        job = str(answer["job_id"])
        accepted |= {
            "job": job,
            "job_status": answer.get("status"),
            "progress": _url_for(request, "job", job_id=job),
        }
    return accepted


def _url_for(request: Request, name: str, **params: str) -> str | None:
    """The URL of a named route when it is mounted (the worker's ``/jobs/{job_id}``), else None."""
    try:
        return str(request.url_for(name, **params))
    except NoMatchFound:
        return None


async def _body(request: Request) -> Any:
    """The JSON body, decoded off the event loop (a large body never stalls /health)."""
    return await run_in_threadpool(parse_json, await request.body())


def _error(error: Exception, route: str) -> JSONResponse:
    status_code = error.status if isinstance(error, PayloadError) else 400
    logger.error("%s rejected: %s", route, str(error)[:300])
    return JSONResponse(
        {"status": "error", "error": str(error)[:1000], "results": []}, status_code=status_code
    )


def create_app(
    settings: Settings | None = None,
    model: DefectModel | None = None,
    webhook_handler: WebhookHandler | None = None,
    routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """The backend app; ``settings`` default to :func:`defect_assist.core.settings.get_settings`.

    ``webhook_handler`` receives each Label Studio webhook off the request path (without one,
    webhooks are only counted); ``routers`` are mounted too (behind the same basic auth).
    """
    settings = settings or get_settings()
    if model is None:
        limits = ServingLimits.from_settings(settings)
        model = DefectModel(
            ModelStore(settings.model_dir),
            LabelStudioClient.from_settings(settings),
            device=settings.device,
            inference_engine=settings.inference_engine,
            webhook_handler=webhook_handler,
            limits=limits,
            sources=ImageSources.from_settings(settings, limits.max_image_bytes),
        )
    sync = LabelStudioSync(
        model.store,
        model.client_for,
        interval=settings.label_studio_sync_interval,
        batch_size=settings.label_studio_predict_batch,
        idle_for=model.activity.idle_for,
    )
    user, password = settings.basic_auth_user, settings.basic_auth_pass
    basic = HTTPBasic(auto_error=False)

    def authorize(credentials: HTTPBasicCredentials | None = Depends(basic)) -> None:
        if not user:
            return
        ok = (
            credentials is not None
            and secrets.compare_digest(credentials.username.encode(), user.encode())
            and secrets.compare_digest(credentials.password.encode(), password.encode())
        )
        if not ok:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "basic auth required", headers={"WWW-Authenticate": "Basic"}
            )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.label_studio_sync:
            sync.start()
        yield
        sync.stop()
        model.close()

    app = FastAPI(
        title="defect-assist ML backend",
        version="0.1.0",
        dependencies=[Depends(authorize)],
        lifespan=lifespan,
    )
    # outermost: credentials from the headers, then the body bounded, before any route reads it
    app.add_middleware(GuardMiddleware, user=user, password=password, max_body=settings.max_request_bytes)
    app.state.model = model
    app.state.image_sources = model.sources
    app.state.limits = model.limits
    app.state.label_studio_sync = sync
    app.state.started = time.time()

    @app.get("/")
    @app.get("/health")
    async def health() -> dict[str, Any]:  # on the event loop: never queued behind busy threads
        return {
            "status": "UP",
            "model_class": "DefectModel",
            "cached_models": [f"{p}/{v}" for p, v in model.cached()],
            "shown_in_label_studio": dict(sync.shown),
        }

    @app.post("/setup")
    async def setup(request: Request) -> JSONResponse:
        try:
            body = setup_request(await _body(request))
            answer = await run_in_threadpool(
                lambda: model.setup(
                    body["project"],
                    body["schema"],
                    hostname=body["hostname"],
                    access_token=body["access_token"],
                    extra_params=body["extra_params"],
                )
            )
        except (LabelConfigError, ValueError) as error:
            return _error(error, "setup")
        with contextlib.suppress(ValueError):
            sync.poke(project_id(body["project"]))
        return JSONResponse(answer)

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            body = predict_request(await _body(request), model.limits.max_tasks_per_request)
            answer = await run_in_threadpool(
                lambda: model.predict(
                    body["tasks"],
                    project=body["project"],
                    label_config=body["label_config"],
                    context=body["context"],
                )
            )
        except (LabelConfigError, ValueError) as error:
            return _error(error, "predict")
        logger.info(
            "predicted %d task(s) in %.3fs (%s)",
            len(body["tasks"]),
            time.perf_counter() - started,
            answer.get("model_version"),
        )
        return JSONResponse(answer)

    @app.post("/webhook", status_code=201)
    async def webhook(request: Request) -> dict[str, Any]:
        try:
            body = webhook_request(await _body(request))
        except PayloadError as error:
            raise HTTPException(400, str(error)[:1000]) from None
        action = body.get("action", "")
        if action == "TASKS_CREATED":  # new tasks get the current version's predictions
            with contextlib.suppress(ValueError):
                project = project_id(body.get("project"))
                if project in model.store.projects():  # only known projects: bounded state
                    sync.refresh(project)
        return _accepted(request, action, await run_in_threadpool(model.fit, action, body))

    @app.post("/train", status_code=201)
    async def train(request: Request) -> dict[str, Any]:
        """Legacy LS training call (no START_TRAINING webhook flag): handed off like the webhook."""
        try:
            body = webhook_request(await _body(request), "/train")
            payload = {"action": "START_TRAINING", "project": {"id": int(project_id(body.get("project")))}}
        except ValueError as error:
            raise HTTPException(400, str(error)[:1000]) from None
        return _accepted(
            request, "START_TRAINING", await run_in_threadpool(model.fit, "START_TRAINING", payload)
        )

    @app.get("/versions")
    def versions(project: str | None = None) -> dict[str, Any]:
        try:
            return model.versions(project)
        except ValueError as error:
            raise HTTPException(400, str(error)) from None

    for router in routers:
        app.include_router(router)

    @app.get("/webhook/stats")
    def webhook_stats() -> dict[str, Any]:
        return {"counts": dict(model.webhook_counts), "handed_off": model.handed_off}

    return app

"""HTTP endpoints for retraining (``POST /retrain``, ``GET /jobs``) and for choosing the served version
(``POST /versions/{version}/promote``, ``POST /versions/rollback``), mounted on the backend app by
``defect-assist serve`` (the command wires the worker in; the serving package never imports it and
stays read-only on the store)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field
from rq.exceptions import NoSuchJobError
from rq.job import Job

from defect_assist.core.settings import get_settings
from defect_assist.core.store import ModelStore, StoreError, VersionConflict
from defect_assist_worker.queues import get_connection
from defect_assist_worker.status import describe_job, list_jobs
from defect_assist_worker.triggers import request_retrain

router = APIRouter(tags=["retraining"])


class RetrainRequest(BaseModel):
    project: str = Field(..., description="Label Studio project id (= model store project).")
    reason: str = "http"
    mode: str | None = Field(None, description="auto | full | incremental (default RETRAIN_MODE).")
    images: list[str] | None = Field(None, description="Local normal images instead of the LS annotations.")


@router.post("/retrain")
def retrain(request: RetrainRequest) -> dict[str, Any]:
    """Request a retrain: one job per project, a request during a running job becomes one follow-up."""

    if request.mode not in (None, "auto", "full", "incremental"):
        raise HTTPException(422, f"unknown mode {request.mode!r}")
    return request_retrain(request.project, request.reason, mode=request.mode, images=request.images)


@router.get("/jobs")
def jobs(project: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Retrain jobs with state, stage, %, ETA and failure reason, newest first."""

    return list_jobs(get_connection(), project, limit)


@router.get("/jobs/{job_id}")
def job(job_id: str) -> dict[str, Any]:

    try:
        return describe_job(Job.fetch(job_id, connection=get_connection()))
    except NoSuchJobError as error:
        raise HTTPException(404, f"no job {job_id}") from error


def _store_action(action: str, project: str, version: str | None) -> dict[str, Any]:
    store = ModelStore(get_settings().model_dir)
    try:
        if action == "promote":
            info = store.promote(project, str(version))
        else:
            info = store.rollback(project, version)
    except VersionConflict as error:
        raise HTTPException(409, str(error)) from error
    except StoreError as error:
        raise HTTPException(404, str(error)) from error
    return info.summary()


@router.post("/versions/rollback")
def rollback(project: str, version: str | None = None) -> dict[str, Any]:
    """Make an earlier version current (default: the last non-candidate one before the current)."""

    return _store_action("rollback", project, version)


@router.post("/versions/{version}/promote")
def promote(version: str, project: str) -> dict[str, Any]:
    """Make a candidate version (a retrain that was not made current) current."""

    return _store_action("promote", project, version)

"""Show a model version in a Label Studio project: its prediction on every task, its scores in the Data
Manager's *Prediction score* column, its name on the project's model card.

Label Studio (1.23, default feature flags) scores, sorts and pre-fills from the predictions whose
``model_version`` equals the *project's* ``model_version``, which it sets to the ML connection's title
when a backend is connected; our predictions carry the store's version (``v0002-patchcore``), so
without :func:`show_version` the score column stays empty. Older versions' predictions of ours are
deleted once the new ones are in: the store keeps every version (a rollback re-predicts), annotations
are never touched, and annotators then see one pre-annotation per task, the served one. Predictions of
other models (other versions than ours) are left alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from defect_assist.label_studio.client import LabelStudioClient, LabelStudioError, project_id

logger = logging.getLogger(__name__)

BACKEND_TITLE = "defect-assist"


class NoBackendConnected(LabelStudioError):
    """The project has no ML backend connected: Label Studio has nobody to ask for predictions."""


@dataclass(frozen=True)
class VersionShown:
    """What :func:`show_version` did in one project."""

    project: str
    version: str
    tasks: int
    predicted: int  # tasks that got a prediction of ``version`` now
    missing: int  # tasks still without one (Label Studio or the backend failed them)
    deleted: int  # older predictions of ours removed
    seconds: float


def backend_title(version: str | None, activity: str = "") -> str:
    """The model card title: which version serves, and what the worker is doing (if anything)."""
    title = f"{BACKEND_TITLE} · serving {version}" if version else f"{BACKEND_TITLE} · no model yet"
    return f"{title} · {activity}" if activity else title


def _our_backends(client: LabelStudioClient, project: str, versions: Collection[str]) -> list[dict]:
    """The project's connections to this backend: titled ``defect-assist…`` or answering our versions
    (Label Studio records the version each connection's ``/setup`` names); other models' are left alone."""
    return [
        b
        for b in client.ml_backends(project)
        if str(b.get("title") or "").startswith(BACKEND_TITLE) or b.get("model_version") in versions
    ]


def _connection_fields(backend: dict[str, Any], project: str) -> dict[str, Any]:
    """What LS 1.23 needs in a PATCH of an ML backend: it re-validates the whole connection (500
    without url and project; with basic auth an empty password keeps the stored one)."""
    fields: dict[str, Any] = {"url": backend["url"], "project": int(project)}
    if backend.get("auth_method") == "BASIC_AUTH":
        fields |= {"auth_method": "BASIC_AUTH", "basic_auth_user": backend.get("basic_auth_user") or ""}
        fields["basic_auth_pass"] = ""
    return fields


def set_activity(
    client: LabelStudioClient,
    project: int | str,
    version: str | None,
    activity: str,
    versions: Collection[str] = (),
) -> int:
    """Write the served version and ``activity`` into our model card's title; returns cards updated."""
    pid = project_id(project)
    updated = 0
    for backend in _our_backends(client, pid, {*versions, *([version] if version else [])}):
        title = backend_title(version, activity)
        if backend.get("title") != title:
            client.update_ml_backend(int(backend["id"]), title=title, **_connection_fields(backend, project))
            updated += 1
    return updated


def _tasks_with(client: LabelStudioClient, project: str, version: str) -> tuple[set[int], list[dict]]:
    predictions = client.predictions(project)
    return {int(p["task"]) for p in predictions if p.get("model_version") == version}, predictions


def _superseded(predictions: list[dict], version: str, own_versions: Collection[str]) -> list[dict]:
    """Our older versions' predictions, and all but the newest of ``version``'s on a task (a manual
    *Retrieve predictions* running at the same time as :func:`show_version` stores one twice)."""
    older = set(own_versions) - {version}
    newest: dict[int, int] = {}
    for prediction in predictions:
        if prediction.get("model_version") == version:
            task, pid = int(prediction["task"]), int(prediction["id"])
            newest[task] = max(newest.get(task, pid), pid)
    return [
        p
        for p in predictions
        if p.get("model_version") in older
        or (p.get("model_version") == version and int(p["id"]) != newest[int(p["task"])])
    ]


def remove_duplicates(client: LabelStudioClient, project: int | str, version: str) -> int:
    """Delete all but the newest of ``version``'s predictions on each task; returns how many went.

    A *Retrieve predictions* someone runs while :func:`show_version` does stores a second prediction
    on the tasks both asked for, possibly after :func:`show_version` looked; the sync calls this once
    the project's ``/predict`` calls have settled."""
    pid = project_id(project)
    _, predictions = _tasks_with(client, pid, version)
    deleted = 0
    for prediction in _superseded(predictions, version, ()):
        client.delete_prediction(int(prediction["id"]))
        deleted += 1
    if deleted:
        logger.info("project %s: %d duplicate %s prediction(s) removed", pid, deleted, version)
    return deleted


def show_version(
    client: LabelStudioClient,
    project: int | str,
    version: str,
    own_versions: Collection[str],
    batch_size: int = 16,
) -> VersionShown:
    """Give every task of ``project`` a prediction of ``version`` and make it the project's version.

    Label Studio is asked (Data Manager action *Retrieve predictions*, ``batch_size`` tasks per call, so
    each call stays well inside its 100 s ``/predict`` timeout) for the tasks that lack one; it calls the
    backend's ``/predict``, which serves ``version``. ``own_versions`` are every version of ours (the
    model store's); their older predictions are deleted. Raises :class:`NoBackendConnected`.
    """
    started = time.monotonic()
    pid = project_id(project)
    if not client.ml_backends(pid):
        raise NoBackendConnected(f"project {pid} has no ML backend connected")
    ids = client.task_ids(pid)
    have, _ = _tasks_with(client, pid, version)
    missing = [task for task in ids if task not in have]
    for start in range(0, len(missing), batch_size):
        client.retrieve_predictions(pid, missing[start : start + batch_size])
    have, predictions = _tasks_with(client, pid, version)
    still_missing = sum(1 for task in ids if task not in have)
    set_activity(client, pid, version, "", own_versions)  # before the version: LS renames on title change
    if have:
        client.set_model_version(pid, version)
    deleted = 0
    if not still_missing:
        for prediction in _superseded(predictions, version, own_versions):
            client.delete_prediction(int(prediction["id"]))
            deleted += 1
    shown = VersionShown(
        pid,
        version,
        len(ids),
        len(missing) - still_missing,
        still_missing,
        deleted,
        time.monotonic() - started,
    )
    logger.info(
        "project %s: %s shown on %d task(s) (%d predicted now, %d missing, %d older deleted) in %.1fs",
        pid,
        version,
        shown.tasks,
        shown.predicted,
        shown.missing,
        shown.deleted,
        shown.seconds,
    )
    return shown

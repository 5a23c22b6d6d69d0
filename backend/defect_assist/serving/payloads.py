"""The shapes the backend accepts: valid JSON of the wrong shape is a 400 naming the field, never a 500.

In ``/predict`` a task of the wrong shape among good ones only empties that task (serving.batch); a
request none of whose tasks has the right shape is a 400.
"""

from __future__ import annotations

import json
from typing import Any


class PayloadError(ValueError):
    """A request body the backend cannot use; ``status`` is the HTTP answer (400 or 413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def parse_json(raw: bytes) -> Any:
    """Decoded JSON; PayloadError for a body that is not JSON (or nested too deep to decode)."""
    if not raw.strip():
        raise PayloadError("expected a JSON body")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise PayloadError(f"invalid JSON body: {str(error)[:200]}") from None


def json_object(body: Any, route: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise PayloadError(f"{route} expects a JSON object, got a {type(body).__name__}")
    return body


def _optional(body: dict[str, Any], field: str, kind: type | tuple[type, ...], route: str) -> Any:
    value = body.get(field)
    if value is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise PayloadError(f"{route}: {field!r} must be {names}, got a {type(value).__name__}")
    return value


def _project_field(body: dict[str, Any], route: str) -> Any:
    project = body.get("project")
    if isinstance(project, bool) or not isinstance(project, int | str | dict | type(None)):
        raise PayloadError(f"{route}: 'project' must be a project id, got a {type(project).__name__}")
    return project


def task_shape_ok(task: Any) -> bool:
    return isinstance(task, dict) and isinstance(task.get("data"), dict)


def predict_request(body: Any, max_tasks: int) -> dict[str, Any]:
    """``tasks``, ``project``, ``label_config``, ``context`` of a /predict body; PayloadError otherwise."""
    body = json_object(body, "/predict")
    tasks = body.get("tasks")
    if tasks is None:
        tasks = []
    if not isinstance(tasks, list):
        raise PayloadError(f"/predict: 'tasks' must be a list, got a {type(tasks).__name__}")
    if len(tasks) > max_tasks:
        raise PayloadError(f"/predict: {len(tasks)} tasks, more than MAX_TASKS_PER_REQUEST={max_tasks}", 413)
    if tasks and not any(task_shape_ok(task) for task in tasks):
        raise PayloadError("/predict: no task is an object with a 'data' object")
    label_config = _optional(body, "label_config", str, "/predict")
    params = _optional(body, "params", dict, "/predict") or {}
    return {
        "tasks": tasks,
        "project": _project_field(body, "/predict"),
        "label_config": label_config,
        "context": params.get("context"),
    }


def setup_request(body: Any) -> dict[str, Any]:
    """The fields of a /setup body: project, schema, hostname, access_token, extra_params."""
    body = json_object(body, "/setup")
    return {
        "project": _project_field(body, "/setup"),
        "schema": _optional(body, "schema", str, "/setup"),
        "hostname": _optional(body, "hostname", str, "/setup"),
        "access_token": _optional(body, "access_token", str, "/setup"),
        "extra_params": body.get("extra_params"),  # any JSON: a free-form field of the LS connection
    }


def webhook_request(body: Any, route: str = "/webhook") -> dict[str, Any]:
    body = json_object(body, route)
    action = body.get("action", "")
    if not isinstance(action, str):
        raise PayloadError(f"{route}: 'action' must be a string, got a {type(action).__name__}")
    return body

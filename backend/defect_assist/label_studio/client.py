"""Label Studio REST client: token auth, project ids, task export, predictions and ML backends.

``LabelStudioClient`` sends ``Authorization: Token <LABEL_STUDIO_API_KEY>`` to ``LABEL_STUDIO_URL``.
Network failures and 5xx answers raise :class:`LabelStudioUnavailable` (transient: a retrain job
retries), other error answers :class:`LabelStudioError`. Task images are read by
:mod:`defect_assist.label_studio.image_sources` (the source rule), not here.
"""

from __future__ import annotations

import base64
import logging
import re
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)
_PROJECT_ID = re.compile(r"[0-9]{1,18}")


class LabelStudioError(RuntimeError):
    """Label Studio answered with an error (bad token, unknown project …)."""


class LabelStudioUnavailable(LabelStudioError):
    """Label Studio could not be reached or answered 5xx (transient)."""


class LabelStudioClient:
    """A small synchronous client for the Label Studio REST API and its media URLs."""

    def __init__(
        self, url: str, token: str = "", timeout: float = 30.0, local_files_root: str | Path | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.local_files_root = Path(local_files_root) if local_files_root else None
        headers = {"Authorization": f"Token {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, follow_redirects=True)

    @classmethod
    def from_settings(cls, settings: Any | None = None, **overrides: Any) -> LabelStudioClient:
        """Client for ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` (``overrides`` win)."""
        if settings is None:
            from defect_assist.core.settings import get_settings

            settings = get_settings()
        kwargs: dict[str, Any] = {"url": settings.label_studio_url, "token": settings.label_studio_api_key}
        root = getattr(settings, "local_files_document_root", None)
        if root:
            kwargs["local_files_root"] = root
        kwargs.update({k: v for k, v in overrides.items() if v})
        return cls(**kwargs)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- REST
    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the API; returns decoded JSON (or None for an empty body); raises LabelStudioError."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise LabelStudioUnavailable(f"Label Studio unreachable at {self.url}: {error}") from error
        if response.status_code >= 500:
            raise LabelStudioUnavailable(
                f"Label Studio {response.status_code} on {method} {path}: {response.text[:300]}"
            )
        if response.status_code >= 400:
            raise LabelStudioError(
                f"Label Studio {response.status_code} on {method} {path}: {response.text[:300]}"
            )
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.text

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, payload: Any = None) -> Any:
        return self.request("POST", path, json=payload)

    def project(self, project: int | str) -> dict[str, Any]:
        return self.get(f"/api/projects/{project_id(project)}/")

    def export_tasks(self, project: int | str, all_tasks: bool = False) -> list[dict[str, Any]]:
        """Tasks with their annotations (only annotated tasks unless ``all_tasks``), via the export API."""
        data = self.get(
            f"/api/projects/{project_id(project)}/export",
            exportType="JSON",
            download_all_tasks=str(all_tasks).lower(),
        )
        if not isinstance(data, list):
            raise LabelStudioError(f"unexpected export answer for project {project}: {str(data)[:200]}")
        return data

    def import_tasks(self, project: int | str, tasks: list[dict[str, Any]]) -> list[int]:
        """Import tasks (with their predictions) into ``project``; returns the new task ids."""
        answer = self.request(
            "POST",
            f"/api/projects/{project_id(project)}/import",
            params={"return_task_ids": "true"},
            json=tasks,
        )
        return [int(t) for t in (answer or {}).get("task_ids", [])]

    def tasks(self, project: int | str, page_size: int = 100) -> list[dict[str, Any]]:
        """All tasks of a project (with predictions and annotations), paging through ``/api/tasks``."""
        found: list[dict[str, Any]] = []
        page = 1
        while True:
            try:
                data = self.get(
                    "/api/tasks", project=project_id(project), page=page, page_size=page_size, fields="all"
                )
            except LabelStudioError as error:
                if "404" in str(error):  # past the last page
                    break
                raise
            batch = data.get("tasks", []) if isinstance(data, dict) else data
            found += batch
            if len(batch) < page_size:
                break
            page += 1
        return found

    def task_ids(self, project: int | str, page_size: int = 500) -> list[int]:
        """Ids of all tasks of a project (no task data)."""
        ids: list[int] = []
        page = 1
        while True:
            try:
                data = self.get(
                    "/api/tasks",
                    project=project_id(project),
                    page=page,
                    page_size=page_size,
                    fields="task_only",
                )
            except LabelStudioError as error:
                if "404" in str(error):
                    break
                raise
            batch = data.get("tasks", []) if isinstance(data, dict) else data
            ids += [int(task["id"]) for task in batch]
            if len(batch) < page_size:
                break
            page += 1
        return ids

    def predictions(self, project: int | str) -> list[dict[str, Any]]:
        """Every prediction stored in a project (``id``, ``task``, ``model_version``, ``score`` …)."""
        data = self.get("/api/predictions/", project=project_id(project))
        return data if isinstance(data, list) else (data or {}).get("results", [])

    def delete_prediction(self, prediction: int) -> None:
        self.request("DELETE", f"/api/predictions/{prediction}/")

    def ml_backends(self, project: int | str) -> list[dict[str, Any]]:
        """The ML backends connected to a project."""
        return self.get("/api/ml", project=project_id(project)) or []

    def update_ml_backend(self, backend: int, **fields: Any) -> dict[str, Any]:
        return self.request("PATCH", f"/api/ml/{backend}", json=fields)

    def retrieve_predictions(self, project: int | str, task_ids: list[int] | None = None) -> Any:
        """The Data Manager's *Retrieve predictions* on some (default all) tasks: LS calls the ML backend's
        ``/setup`` then ``/predict`` and stores what it answers (it skips tasks that already carry a
        prediction of the version ``/setup`` names)."""
        pid = project_id(project)
        selected = {"all": False, "included": task_ids} if task_ids else {"all": True, "excluded": []}
        return self.request(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": pid},
            json={"project": pid, "selectedItems": selected},
        )

    def set_model_version(self, project: int | str, version: str) -> None:
        """The project's model version: which predictions the Data Manager shows, scores and sorts by."""
        self.request("PATCH", f"/api/projects/{project_id(project)}/", json={"model_version": version})

    def authorize_webhook(self, project: int | str, backend_url: str, user: str, password: str) -> int | None:
        """Add basic-auth headers to the webhook LS created for a backend (LS sends none by itself).

        Label Studio registers ``<backend>/webhook`` when an ML backend is connected, but sends that
        webhook without the connection's basic-auth credentials; returns the webhook id, or None.
        """
        target = backend_url.rstrip("/") + "/webhook"
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        for hook in self.get("/api/webhooks", project=project_id(project)) or []:
            if hook.get("url", "").rstrip("/") == target:
                headers = {**(hook.get("headers") or {}), "Authorization": f"Basic {token}"}
                self.request("PATCH", f"/api/webhooks/{hook['id']}", json={"headers": headers})
                return int(hook["id"])
        return None


def project_id(project: int | str | dict[str, Any] | None) -> str:
    """The numeric LS project id as a string: ``"3.1716"`` (/setup) → ``"3"``, ``{"id": 3}`` → ``"3"``."""
    if isinstance(project, dict):
        project = project.get("id")
    if project is None or str(project).strip() == "":
        raise ValueError("no Label Studio project id")
    text = str(project).strip().split(".", 1)[0]
    if not _PROJECT_ID.fullmatch(text):  # ASCII digits only: "²".isdigit() is True
        raise ValueError(f"not a Label Studio project id: {project!r}")
    return text

"""What the retrain job needs from Label Studio: the export of annotated tasks, image bytes, verdicts.

Talks through the backend's :class:`defect_assist.label_studio.LabelStudioClient` when installed
(one module for LS access), else through a minimal httpx fallback; either way network failures and
5xx answers become :class:`LabelStudioUnavailable` (transient: the job retries with backoff) and
other errors :class:`LabelStudioError` (the job fails at once with the reason).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import httpx
import numpy as np

IMAGE_EXTENSIONS = re.compile(r"\.(jpe?g|png|bmp|tiff?|webp)(\?|$)", re.IGNORECASE)
NORMAL_WORDS = {"normal", "good", "ok", "no defect", "nodefect", "no_defect"}
REGION_TYPES = {"brushlabels", "polygonlabels", "rectanglelabels", "ellipselabels", "keypointlabels"}


class LabelStudioUnavailable(ConnectionError):
    """Label Studio could not be reached or answered 5xx (transient: retried with backoff)."""


class LabelStudioError(RuntimeError):
    """Label Studio answered with a client error (bad token, unknown project): not retried."""


@dataclass
class LabeledImage:
    """One annotated task reduced to what training needs."""

    task_id: int
    url: str
    verdict: str  # normal | anomalous
    mask: np.ndarray | None = None  # HxW bool union of brush regions, when any
    regions: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class LabelStudioExport:
    """Read a project's annotated tasks and their images."""

    def __init__(self, url: str, token: str, timeout: float = 30.0, settings: Any = None) -> None:
        self.url = url.rstrip("/") + "/"
        self.headers = {"Authorization": f"Token {token}"} if token else {}
        self.timeout = timeout
        try:
            from defect_assist.label_studio import LabelStudioClient
        except ImportError:
            self.client = None
        else:
            self.client = LabelStudioClient.from_settings(settings, url=url, token=token)

    def _shared(self, call: Any, *args: Any) -> Any:
        """Call the backend's client, classifying its errors as transient or not."""
        try:
            return call(*args)
        except Exception as error:
            cause = error.__cause__
            if isinstance(cause, httpx.TransportError) or re.search(r"(Label Studio|HTTP) 5\d\d", str(error)):
                raise LabelStudioUnavailable(str(error)) from error
            raise LabelStudioError(str(error)) from error

    def _get(self, path: str, **params: Any) -> httpx.Response:
        target = path if path.startswith(("http://", "https://")) else urljoin(self.url, path.lstrip("/"))
        try:
            response = httpx.get(
                target,
                headers=self.headers,
                params=params or None,
                timeout=self.timeout,
                follow_redirects=True,
            )
        except httpx.TransportError as error:
            raise LabelStudioUnavailable(f"Label Studio unreachable at {self.url}: {error}") from error
        if response.status_code >= 500:
            raise LabelStudioUnavailable(f"Label Studio {response.status_code} for {path}")
        if response.status_code >= 400:
            raise LabelStudioError(f"Label Studio {response.status_code} for {path}: {response.text[:300]}")
        return response

    def export(self, project: int | str) -> list[dict[str, Any]]:
        """Annotated tasks of ``project`` (export API, JSON), each with its annotations."""
        if self.client is not None:
            return list(self._shared(self.client.export_tasks, project))
        response = self._get(f"/api/projects/{project}/export", exportType="JSON", download_all_tasks="false")
        return list(response.json())

    def image_bytes(self, url: str) -> bytes:
        """Bytes of a task image: relative LS URLs get the LS host and token; absolute ones are fetched."""
        if self.client is not None:
            return bytes(self._shared(self.client.fetch_image, url))
        return self._get(url).content


def image_url(task: dict[str, Any]) -> str | None:
    """The task's image URL: ``data.image``, else the first value that looks like an image."""
    data = task.get("data", {})
    if isinstance(data.get("image"), str):
        return data["image"]
    for value in data.values():
        if isinstance(value, str) and (value.startswith("/data/") or IMAGE_EXTENSIONS.search(value)):
            return value
    return None


def _decode_brush(region: dict[str, Any]) -> np.ndarray | None:
    value = region.get("value", {})
    if value.get("format") != "rle" or not value.get("rle"):
        return None
    from label_studio_sdk.converter.brush import decode_rle

    height, width = int(region["original_height"]), int(region["original_width"])
    return decode_rle(value["rle"]).reshape(height, width, 4)[:, :, 3] > 0


def classify_annotation(result: list[dict[str, Any]]) -> tuple[str, np.ndarray | None, int]:
    """``(verdict, mask, n_regions)`` of one annotation's result list.

    Anomalous when a choice says so (anything but a normal word) or any defect region is drawn;
    normal when the choice is normal or, without a choice, when no region is drawn.
    """
    mask: np.ndarray | None = None
    regions = 0
    choices: list[str] = []
    for item in result:
        kind = item.get("type", "")
        if kind == "choices":
            choices += [str(c).strip().lower() for c in item.get("value", {}).get("choices", [])]
        elif kind in REGION_TYPES:
            regions += 1
            if kind == "brushlabels":
                decoded = _decode_brush(item)
                if decoded is not None:
                    mask = decoded if mask is None or mask.shape != decoded.shape else (mask | decoded)
    if choices:
        verdict = "normal" if all(c in NORMAL_WORDS for c in choices) and not regions else "anomalous"
    else:
        verdict = "anomalous" if regions else "normal"
    return verdict, mask, regions


def latest_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    """The most recent non-cancelled annotation of a task."""
    annotations = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
    if not annotations:
        return None
    return max(
        annotations, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id", 0))
    )


def labeled_images(tasks: list[dict[str, Any]]) -> list[LabeledImage]:
    """Annotated tasks with an image, reduced to verdict and mask."""
    found = []
    for task in tasks:
        annotation = latest_annotation(task)
        url = image_url(task)
        if annotation is None or url is None:
            continue
        verdict, mask, regions = classify_annotation(annotation.get("result", []))
        found.append(LabeledImage(int(task["id"]), url, verdict, mask, regions))
    return found

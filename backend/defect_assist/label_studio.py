"""Talking to Label Studio: token-authenticated client, image URLs, export, and prediction regions.

One module used by the ML backend (``defect_assist.server``) and the retraining worker:

- :class:`LabelStudioClient` — ``Authorization: Token <LABEL_STUDIO_API_KEY>`` against
  ``LABEL_STUDIO_URL``; resolves task image URLs (``/data/local-files/?d=``, ``/data/upload/``,
  absolute http(s), ``file://`` and local paths) and fetches their bytes; exports tasks with
  annotations through the export API.
- :class:`ControlSpec` — which tags of a labeling config to fill, read with the SDK's
  ``LabelInterface``; an unusable config raises :class:`LabelConfigError` with a clear message.
- :func:`prediction_regions` — BrushLabels RLE (``label_studio_sdk.converter.brush``), the
  normal/anomalous Choices verdict, and optional PolygonLabels/RectangleLabels from mask contours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import httpx
import numpy as np

logger = logging.getLogger(__name__)

NORMAL_CHOICES = ("normal", "good", "ok", "no defect", "no_defect", "pass")
ANOMALOUS_CHOICES = ("anomalous", "anomaly", "defect", "defective", "ng", "bad", "fail", "abnormal")
DEFECT_LABEL_HINTS = ("defect", "anomal", "anomaly", "ng", "damage")


class LabelStudioError(RuntimeError):
    """Label Studio answered with an error or could not be reached."""


class LabelConfigError(ValueError):
    """The labeling config has nothing this backend can fill."""


# ---------------------------------------------------------------------------------------- client
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
            from defect_assist.settings import get_settings

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
            raise LabelStudioError(f"Label Studio unreachable at {self.url}: {error}") from error
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

    def authorize_webhook(self, project: int | str, backend_url: str, user: str, password: str) -> int | None:
        """Add basic-auth headers to the webhook LS created for a backend (LS sends none by itself).

        Label Studio registers ``<backend>/webhook`` when an ML backend is connected, but sends that
        webhook without the connection's basic-auth credentials; returns the webhook id, or None.
        """
        import base64

        target = backend_url.rstrip("/") + "/webhook"
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        for hook in self.get("/api/webhooks", project=project_id(project)) or []:
            if hook.get("url", "").rstrip("/") == target:
                headers = {**(hook.get("headers") or {}), "Authorization": f"Basic {token}"}
                self.request("PATCH", f"/api/webhooks/{hook['id']}", json={"headers": headers})
                return int(hook["id"])
        return None

    # ----------------------------------------------------------------- images
    def resolve(self, url: str) -> str:
        """Absolute URL or local path an image reference points at."""
        url = str(url).strip()
        if url.startswith(("http://", "https://")):
            return url
        if url.startswith("file://"):
            return unquote(urlparse(url).path)
        if url.startswith("/data/") or url.startswith("data/"):
            return f"{self.url}/{url.lstrip('/')}"
        return url  # a local path

    def _local_file(self, url: str) -> Path | None:
        """The file behind a ``/data/local-files/?d=`` URL when it is readable here (skips HTTP)."""
        if self.local_files_root is None or "/data/local-files" not in url:
            return None
        relative = parse_qs(urlparse(url).query).get("d", [None])[0]
        if not relative:
            return None
        path = (self.local_files_root / relative).resolve()
        root = self.local_files_root.resolve()
        return path if path.is_relative_to(root) and path.is_file() else None

    def fetch_image(self, url: str) -> bytes:
        """Bytes of the image a task refers to; raises LabelStudioError naming the URL."""
        local = self._local_file(url)
        if local is not None:
            return local.read_bytes()
        target = self.resolve(url)
        if not target.startswith(("http://", "https://")):
            path = Path(target).expanduser()
            if not path.is_file():
                raise LabelStudioError(f"image {url!r} is neither a Label Studio URL nor a readable file")
            return path.read_bytes()
        same_host = target.startswith(self.url + "/")
        try:
            if same_host:
                response = self.http.get(target)
            else:  # foreign hosts never receive the Label Studio token
                response = httpx.get(target, timeout=self.http.timeout, follow_redirects=True)
        except httpx.HTTPError as error:
            raise LabelStudioError(f"cannot fetch image {url}: {error}") from error
        if response.status_code >= 400:
            raise LabelStudioError(f"cannot fetch image {url}: HTTP {response.status_code}")
        return response.content


def project_id(project: int | str | dict[str, Any] | None) -> str:
    """The numeric LS project id as a string: ``"3.1716"`` (/setup) → ``"3"``, ``{"id": 3}`` → ``"3"``."""
    if isinstance(project, dict):
        project = project.get("id")
    if project is None or str(project).strip() == "":
        raise ValueError("no Label Studio project id")
    text = str(project).strip().split(".", 1)[0]
    if not text.isdigit():
        raise ValueError(f"not a Label Studio project id: {project!r}")
    return text


# ---------------------------------------------------------------------------------------- config
@dataclass
class ControlSpec:
    """The tags of a labeling config this backend fills, all pointing at one Image tag."""

    image: str  # Image tag name (to_name)
    image_key: str  # task data key holding the URL ($image → image)
    brush: str | None = None
    brush_label: str | None = None
    choices: str | None = None
    normal_choice: str | None = None
    anomalous_choice: str | None = None
    polygon: str | None = None
    polygon_label: str | None = None
    rectangle: str | None = None
    rectangle_label: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def fills(self) -> list[str]:
        return [name for name in (self.brush, self.choices, self.polygon, self.rectangle) if name]

    @classmethod
    def from_config(cls, config: str) -> ControlSpec:
        """Read a labeling config; raises :class:`LabelConfigError` when nothing can be filled."""
        from label_studio_sdk.label_interface import LabelInterface

        if not config or not config.strip():
            raise LabelConfigError("empty labeling config")
        try:
            interface = LabelInterface(config)
        except Exception as error:  # the SDK raises several parse error types
            raise LabelConfigError(f"cannot parse labeling config: {error}") from error
        images = [o for o in interface.objects if o.tag == "Image"]
        if not images:
            raise LabelConfigError("labeling config has no <Image> tag; this backend predicts on images")
        by_image: dict[str, dict[str, Any]] = {image.name: {} for image in images}
        for control in interface.controls:
            for target in control.to_name or []:
                if target in by_image:
                    by_image[target].setdefault(control.tag, control)
        image = max(images, key=lambda o: len(by_image[o.name]))
        controls = by_image[image.name]
        value = str(image.value or "")
        spec = cls(image=image.name, image_key=value.lstrip("$") or image.name)
        if "BrushLabels" in controls:
            spec.brush = controls["BrushLabels"].name
            spec.brush_label = _pick_label(controls["BrushLabels"].labels)
        if "PolygonLabels" in controls:
            spec.polygon = controls["PolygonLabels"].name
            spec.polygon_label = _pick_label(controls["PolygonLabels"].labels)
        if "RectangleLabels" in controls:
            spec.rectangle = controls["RectangleLabels"].name
            spec.rectangle_label = _pick_label(controls["RectangleLabels"].labels)
        if "Choices" in controls:
            labels = list(controls["Choices"].labels or [])
            normal = _match(labels, NORMAL_CHOICES)
            anomalous = _match(labels, ANOMALOUS_CHOICES)
            if normal and anomalous:
                spec.choices, spec.normal_choice, spec.anomalous_choice = (
                    controls["Choices"].name,
                    normal,
                    anomalous,
                )
            else:
                spec.warnings.append(
                    f"Choices {controls['Choices'].name!r} has no normal/anomalous pair among {labels}; "
                    "verdict not filled"
                )
        if not spec.fills:
            raise LabelConfigError(
                "labeling config has no BrushLabels, PolygonLabels, RectangleLabels or normal/anomalous "
                f"Choices on <Image name={image.name!r}>; nothing to pre-annotate"
            )
        return spec


def _match(labels: list[str], words: tuple[str, ...]) -> str | None:
    for word in words:
        for label in labels:
            if label.strip().lower() == word:
                return label
    return None


def _pick_label(labels: list[str] | None) -> str | None:
    labels = list(labels or [])
    for label in labels:
        if any(hint in label.lower() for hint in DEFECT_LABEL_HINTS):
            return label
    return labels[0] if labels else None


# ---------------------------------------------------------------------------------------- regions
def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE of a boolean HxW mask."""
    from label_studio_sdk.converter.brush import mask2rle

    return mask2rle(np.asarray(mask, dtype=bool).astype(np.uint8) * 255)


def rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Boolean HxW mask of a Label Studio brush RLE."""
    from label_studio_sdk.converter.brush import decode_rle

    return decode_rle(rle).reshape(height, width, 4)[:, :, 3] > 0


def mask_contours(mask: np.ndarray, min_area: int = 4, max_points: int = 200) -> list[np.ndarray]:
    """Outer contours (``N x 2`` x,y pixel arrays) of the mask's regions, simplified."""
    import cv2

    contours, _ = cv2.findContours(np.asarray(mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    found = []
    for contour in contours:
        if cv2.contourArea(contour) < min_area:
            continue
        epsilon = 0.5
        simplified = contour
        while len(simplified) > max_points:
            epsilon *= 2
            simplified = cv2.approxPolyDP(contour, epsilon, True)
        if len(simplified) >= 3:
            found.append(simplified.reshape(-1, 2))
    return found


def prediction_regions(prediction: Any, spec: ControlSpec) -> list[dict[str, Any]]:
    """Label Studio result regions for one :class:`~defect_assist.models.Prediction`."""
    if prediction.error is not None or prediction.mask is None:
        return []
    mask = np.asarray(prediction.mask, dtype=bool)
    height, width = mask.shape
    score = float(prediction.score)
    common = {
        "to_name": spec.image,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
    }
    regions: list[dict[str, Any]] = []
    if spec.choices:
        choice = spec.anomalous_choice if prediction.is_anomalous else spec.normal_choice
        regions.append(
            {
                "from_name": spec.choices,
                "to_name": spec.image,
                "type": "choices",
                "value": {"choices": [choice]},
                "score": score,
            }
        )
    if not mask.any():
        return regions
    if spec.brush:
        regions.append(
            {
                **common,
                "from_name": spec.brush,
                "type": "brushlabels",
                "score": score,
                "value": {
                    "format": "rle",
                    "rle": mask_to_rle(mask),
                    "brushlabels": [spec.brush_label] if spec.brush_label else [],
                },
            }
        )
    if spec.polygon or spec.rectangle:
        for contour in mask_contours(mask):
            xs, ys = contour[:, 0].astype(float), contour[:, 1].astype(float)
            if spec.polygon:
                points = [
                    [round(100.0 * x / width, 3), round(100.0 * y / height, 3)]
                    for x, y in zip(xs, ys, strict=True)
                ]
                regions.append(
                    {
                        **common,
                        "from_name": spec.polygon,
                        "type": "polygonlabels",
                        "score": score,
                        "value": {
                            "points": points,
                            "closed": True,
                            "polygonlabels": [spec.polygon_label] if spec.polygon_label else [],
                        },
                    }
                )
            if spec.rectangle:
                x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                regions.append(
                    {
                        **common,
                        "from_name": spec.rectangle,
                        "type": "rectanglelabels",
                        "score": score,
                        "value": {
                            "x": 100.0 * x0 / width,
                            "y": 100.0 * y0 / height,
                            "width": 100.0 * (x1 - x0) / width,
                            "height": 100.0 * (y1 - y0) / height,
                            "rotation": 0,
                            "rectanglelabels": [spec.rectangle_label] if spec.rectangle_label else [],
                        },
                    }
                )
    return regions

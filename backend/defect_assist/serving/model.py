"""``DefectModel``: the Label Studio ML backend model (``LabelStudioMLBase`` shape: setup/predict/fit).

It never trains: it serves the *current* published version of each project from the model store,
caches loaded models per ``(project, version)`` and hot-swaps when the store's pointer moves, so a
retrain by the worker shows up as a new ``model_version`` without a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from defect_assist.core.store import ModelStore
from defect_assist.label_studio.client import LabelStudioClient, project_id
from defect_assist.label_studio.label_config import ControlSpec, LabelConfigError
from defect_assist.label_studio.regions import prediction_regions

logger = logging.getLogger(__name__)

NO_MODEL_VERSION = "no-model"
START_TRAINING_WAIT_S = 0.8  # Label Studio's webhook timeout is 1 s
WebhookHandler = Callable[[dict[str, Any]], dict[str, Any]]


class DefectModel:
    """Serves anomaly predictions to Label Studio from the versioned model store."""

    def __init__(
        self,
        store: ModelStore,
        client: LabelStudioClient | None = None,
        device: str = "auto",
        webhook_handler: WebhookHandler | None = None,
        fetch_threads: int = 4,
    ) -> None:
        self.store = store
        self.client = client or LabelStudioClient.from_settings()
        self.device = device
        self._models: dict[tuple[str, str], Any] = {}
        self._load_lock = threading.Lock()
        self._predict_lock = threading.Lock()  # one forward pass at a time: CPU cores are few
        self._schemas: dict[str, str] = {}
        self._project_clients: dict[str, LabelStudioClient] = {}
        self._specs: dict[str, ControlSpec] = {}
        self._fetch = ThreadPoolExecutor(max_workers=fetch_threads, thread_name_prefix="ls-fetch")
        self._handoff = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webhook")
        self.handler = webhook_handler  # the worker's trigger logic, wired in by ``defect-assist serve``
        self.webhook_counts: Counter[str] = Counter()
        self.webhook_results: list[dict[str, Any]] = []
        self.loads = 0

    # ------------------------------------------------------------------ versions and cache
    def current_version(self, project: str) -> str | None:
        return self.store.current_version(project)

    def model_for(self, project: str) -> tuple[str | None, Any | None]:
        """``(version, model)`` for the project's current version (loaded once, then cached)."""
        version = self.current_version(project)
        if version is None:
            return None, None
        key = (project, version)
        model = self._models.get(key)
        if model is not None:
            return version, model
        with self._load_lock:
            model = self._models.get(key)
            if model is None:
                started = time.perf_counter()
                model = self.store.load(project, version, device=self.device)
                self.loads += 1
                for old in [k for k in self._models if k[0] == project]:
                    del self._models[old]  # hot swap: drop the superseded version
                self._models[key] = model
                logger.info(
                    "project %s: loaded model %s in %.2fs", project, version, time.perf_counter() - started
                )
        return version, model

    def client_for(self, project: str) -> LabelStudioClient | None:
        """The Label Studio client for a project: ``LABEL_STUDIO_API_KEY``, else the token /setup sent."""
        if self.client.token:
            return self.client
        return self._project_clients.get(project)

    def cached(self) -> list[tuple[str, str]]:
        return sorted(self._models)

    # ------------------------------------------------------------------ LS protocol
    def spec_for(self, project: str, label_config: str | None) -> ControlSpec:
        config = label_config or self._schemas.get(project)
        if not config:
            raise LabelConfigError(
                f"no labeling config known for project {project} (call /setup or send label_config)"
            )
        spec = self._specs.get(config)
        if spec is None:
            spec = ControlSpec.from_config(config)
            self._specs[config] = spec
        return spec

    def setup(
        self,
        project: Any,
        schema: str | None = None,
        hostname: str | None = None,
        access_token: str | None = None,
        **_: Any,
    ) -> dict[str, Any]:
        """Validate the labeling config and answer the current ``model_version``; raises LabelConfigError.

        Without ``LABEL_STUDIO_API_KEY`` the project's images are fetched with the ``hostname`` and
        ``access_token`` (the project owner's token) that Label Studio sends here.
        """
        pid = project_id(project)
        spec = ControlSpec.from_config(schema or "")
        if not self.client.token and hostname and access_token and pid not in self._project_clients:
            self._project_clients[pid] = LabelStudioClient(hostname, access_token)
        self._schemas[pid] = schema or ""
        self._specs[schema or ""] = spec
        for warning in spec.warnings:
            logger.warning("project %s: %s", pid, warning)
        version = self.current_version(pid)
        if version is None:
            logger.info(
                "project %s: no trained model yet; predictions will be empty until one is published", pid
            )
        return {"model_version": version or NO_MODEL_VERSION, "fills": spec.fills, "warnings": spec.warnings}

    def predict(
        self, tasks: list[dict[str, Any]], project: Any = None, label_config: str | None = None, **_: Any
    ) -> dict[str, Any]:
        """One ``{"result", "score", "model_version"}`` per task, in task order."""
        if project is None and tasks:
            project = tasks[0].get("project")
        pid = project_id(project)
        version, model = self.model_for(pid)
        if model is None:
            logger.info(
                "project %s: no trained model yet, answering %d task(s) with no predictions", pid, len(tasks)
            )
            return {"results": [], "model_version": NO_MODEL_VERSION}
        spec = self.spec_for(pid, label_config)
        client = self._project_clients.get(pid, self.client)
        images: list[bytes | None] = list(
            self._fetch.map(lambda task: self._image(task, spec, client), tasks)
        )
        good = [i for i, image in enumerate(images) if image is not None]
        predictions: dict[int, Any] = {}
        if good:
            with self._predict_lock:
                for index, prediction in zip(good, model.predict([images[i] for i in good]), strict=True):
                    predictions[index] = prediction
        results = []
        for i, task in enumerate(tasks):
            prediction = predictions.get(i)
            if prediction is None or prediction.error is not None:
                if prediction is not None:
                    logger.error("task %s: %s", task.get("id"), prediction.error)
                results.append({"result": [], "score": 0.0, "model_version": version})
                continue
            results.append(
                {
                    "result": prediction_regions(prediction, spec),
                    "score": round(float(prediction.score), 6),
                    "model_version": version,
                }
            )
        return {"results": results, "model_version": version}

    def _image(self, task: dict[str, Any], spec: ControlSpec, client: LabelStudioClient) -> bytes | None:
        data = task.get("data") or {}
        url = data.get(spec.image_key) or (next(iter(data.values())) if len(data) == 1 else None)
        if not url:
            logger.error("task %s: no image under data[%r]", task.get("id"), spec.image_key)
            return None
        try:
            return client.fetch_image(str(url))
        except Exception as error:  # one bad task never fails the batch
            logger.error("task %s: %s", task.get("id"), error)
            return None

    def versions(self, project: Any | None = None) -> dict[str, Any]:
        if project is None:
            projects = self.store.projects()
            return {"versions": sorted({v.version for p in projects for v in self.store.versions(p)})}
        pid = project_id(project)
        return {
            "versions": [v.version for v in self.store.versions(pid)],
            "current": self.current_version(pid),
        }

    # ------------------------------------------------------------------ webhooks / fit
    def fit(self, event: str, data: dict[str, Any], **_: Any) -> dict[str, Any] | None:
        """Accept a webhook at once; the worker's trigger logic runs in a background thread.

        For ``START_TRAINING`` the answer (the job id, which Label Studio records for the *Start
        training* button) is waited for up to ``START_TRAINING_WAIT_S``: requesting a retrain takes
        milliseconds; a slow Redis only costs the answer its job id, never the request.
        """
        project = data.get("project")
        if isinstance(project, dict):
            project = project.get("id")
        self.webhook_counts[f"{event}:{project}"] += 1
        future = self._handoff.submit(self._hand_off, data)
        if event == "START_TRAINING" and self.handler is not None:
            try:
                return future.result(timeout=START_TRAINING_WAIT_S)
            except FutureTimeout:
                logger.warning("START_TRAINING: no job id within %.1fs", START_TRAINING_WAIT_S)
        return None

    def _hand_off(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        handler = self.handler
        if handler is None:
            return None
        try:
            answer = handler(payload)
        except Exception:
            logger.exception("webhook %s hand-off failed", payload.get("action"))
            return None
        logger.info("webhook %s → %s", payload.get("action"), answer)
        self.webhook_results.append(answer)
        return answer

    def close(self) -> None:
        self._fetch.shutdown(wait=False, cancel_futures=True)
        self._handoff.shutdown(wait=True, cancel_futures=False)
        self.client.close()
        for client in self._project_clients.values():
            client.close()

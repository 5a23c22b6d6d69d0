"""``DefectModel``: the Label Studio ML backend model (``LabelStudioMLBase`` shape: setup/predict/fit).

It never trains: it serves the *current* published version of each project from the model store,
caches loaded models per ``(project, version)`` and hot-swaps when the store's pointer moves, so a
retrain by the worker shows up as a new ``model_version`` without a restart.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from defect_assist.core.export import ExportError, use_export
from defect_assist.core.store import ModelStore
from defect_assist.label_studio.client import LabelStudioClient, project_id
from defect_assist.label_studio.image_sources import ImageSources, LabelStudioOrigin
from defect_assist.label_studio.label_config import ControlSpec, LabelConfigError
from defect_assist.label_studio.regions import prediction_regions
from defect_assist.serving.batch import BatchPredictor
from defect_assist.serving.label_studio_sync import ProjectActivity
from defect_assist.serving.limits import FairLock, LRUDict, ServingLimits

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
        inference_engine: str = "torch",
        webhook_handler: WebhookHandler | None = None,
        limits: ServingLimits | None = None,
        sources: ImageSources | None = None,
    ) -> None:
        self.store = store
        self.client = client or LabelStudioClient.from_settings()
        self.device = device
        self.inference_engine = inference_engine
        self.limits = limits = limits or ServingLimits()
        self.sources = sources or ImageSources(
            self.client.url, self.client.local_files_root, max_bytes=limits.max_image_bytes
        )
        self._models: dict[tuple[str, str], Any] = {}
        self._load_lock = threading.Lock()
        # one forward pass at a time (CPU cores are few), granted in arrival order, per chunk
        self._predict_lock = FairLock()
        self.batch = BatchPredictor(self.sources, limits, self._predict_lock)
        self.activity = ProjectActivity(limits.max_projects)  # /predict calls per project (the sync waits)
        self._schemas: LRUDict[str, str] = LRUDict(limits.max_projects)
        self._project_clients: LRUDict[str, LabelStudioClient] = LRUDict(
            limits.max_projects, on_evict=lambda client: client.close()
        )
        self._specs: LRUDict[str, ControlSpec] = LRUDict(limits.max_label_configs)  # by config digest
        self._handoff = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webhook")
        self.handler = webhook_handler  # the worker's trigger logic, wired in by ``defect-assist serve``
        self.webhook_counts: Counter[str] = Counter()
        self.webhook_results: deque[dict[str, Any]] = deque(maxlen=limits.max_webhook_results)
        self.handed_off = 0
        self.webhooks_dropped = 0
        self._pending_webhooks = 0
        self._webhook_lock = threading.Lock()
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
                self._attach_engine(model, project, version)
                self.loads += 1
                for old in [k for k in self._models if k[0] == project]:
                    del self._models[old]  # hot swap: drop the superseded version
                self._models[key] = model
                logger.info(
                    "project %s: loaded model %s in %.2fs", project, version, time.perf_counter() - started
                )
        return version, model

    def _attach_engine(self, model: Any, project: str, version: str) -> None:
        """Serve ``model`` through its ONNX/OpenVINO export when configured; torch if it has none."""
        if self.inference_engine == "torch":
            return
        try:
            use_export(model, self.store.project_dir(project) / version, self.inference_engine)
        except (ExportError, RuntimeError, OSError) as error:  # a failed export must not stop serving
            logger.warning("project %s %s: serving with torch: %s", project, version, error)

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
        digest = hashlib.sha256(config.encode()).hexdigest()
        spec = self._specs.get(digest)
        if spec is None:
            spec = ControlSpec.from_config(config)
            self._specs[digest] = spec
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
            self.sources.trust(hostname)  # that project's Label Studio: its /data/ paths, its token
        self._schemas[pid] = schema or ""
        self._specs[hashlib.sha256((schema or "").encode()).hexdigest()] = spec
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
        """One ``{"result", "score", "model_version"}`` per task, in task order (see serving.batch)."""
        if project is None and tasks and isinstance(tasks[0], dict):
            project = tasks[0].get("project")
        pid = project_id(project)
        version, model = self.model_for(pid)
        if model is None:
            logger.info(
                "project %s: no trained model yet, answering %d task(s) with no predictions", pid, len(tasks)
            )
            return {"results": [], "model_version": NO_MODEL_VERSION}
        spec = self.spec_for(pid, label_config)
        client = self._project_clients.get(pid) or self.client
        origin = LabelStudioOrigin(client.url, client.token)

        def render(prediction: Any) -> dict[str, Any]:
            return {
                "result": prediction_regions(prediction, spec),
                "score": round(float(prediction.score), 6),
                "model_version": version,
            }

        with self.activity.predicting(pid):
            answers = self.batch.run(tasks, model, spec, origin, render, project=pid)
        # A failed task answers an empty list of predictions: Label Studio (1.23 takes a list per task)
        # keeps the batch aligned, stores nothing for it and asks again later, instead of storing a
        # "normal, score 0" that would sort the unread image as the most normal one for this version.
        return {"results": [answer or [] for answer in answers], "model_version": version}

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
        try:
            project = project_id(data.get("project"))
        except ValueError:
            project = "None"
        with self._webhook_lock:  # bounded: a client can send any event and project names
            key = f"{str(event)[:64]}:{project}"
            if key not in self.webhook_counts and len(self.webhook_counts) >= self.limits.max_webhook_keys:
                key = "other"
            self.webhook_counts[key] += 1
            if self._pending_webhooks >= self.limits.max_pending_webhooks:
                self.webhooks_dropped += 1
                logger.error("webhook %s dropped: %d hand-offs already queued", key, self._pending_webhooks)
                return None
            self._pending_webhooks += 1
        future = self._handoff.submit(self._hand_off, data)
        if event == "START_TRAINING" and self.handler is not None:
            try:
                return future.result(timeout=START_TRAINING_WAIT_S)
            except FutureTimeout:
                logger.warning("START_TRAINING: no job id within %.1fs", START_TRAINING_WAIT_S)
        return None

    def _hand_off(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        try:
            handler = self.handler
            if handler is None:
                return None
            try:
                answer = handler(payload)
            except Exception:
                logger.exception("webhook %s hand-off failed", str(payload.get("action"))[:64])
                return None
            logger.info("webhook %s → %s", str(payload.get("action"))[:64], answer)
            with self._webhook_lock:
                self.webhook_results.append(answer)
                self.handed_off += 1
            return answer
        finally:
            with self._webhook_lock:
                self._pending_webhooks -= 1

    def close(self) -> None:
        self._handoff.shutdown(wait=True, cancel_futures=False)
        self.client.close()
        for client in self._project_clients.values():
            client.close()
        self.sources.close()

"""One /predict batch, each task on its own: fetched, checked, decoded and predicted in bounded chunks.

- every failure of one task (bad task data, refused source, fetch error or deadline, too many bytes or
  pixels, undecodable, a model error) makes that task's answer empty with a logged reason;
- fetches run in a pool of this request only (``IMAGE_FETCH_THREADS``), a bounded look-ahead ahead of
  the prediction, each within ``IMAGE_FETCH_TIMEOUT`` seconds in total (a fetch past it is aborted);
- images are decoded just before their chunk (``PREDICT_CHUNK`` images) is predicted under the shared
  :class:`~defect_assist.serving.limits.FairLock`, released between chunks so other requests take turns;
  a chunk's full-size maps are turned into regions and dropped before the next one;
- past ``PREDICT_TIMEOUT`` the remaining tasks answer empty, so Label Studio (100 s) gets an answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from defect_assist.core.images import ImageLoadError, image_size, load_image
from defect_assist.label_studio.image_sources import (
    Fetch,
    ImageFetchError,
    ImageRefused,
    ImageSources,
    LabelStudioOrigin,
    describe,
)
from defect_assist.label_studio.label_config import ControlSpec
from defect_assist.serving.limits import FairLock, ServingLimits

logger = logging.getLogger(__name__)
Render = Callable[[Any], dict[str, Any]]


def image_reference(task: Any, spec: ControlSpec) -> str:
    """The image reference of a task; ValueError (the reason) for a task of the wrong shape."""
    if not isinstance(task, dict):
        raise ValueError(f"task is a {type(task).__name__}, not an object")
    data = task.get("data")
    if not isinstance(data, dict):
        raise ValueError(f"task data is a {type(data).__name__}, not an object")
    url = data.get(spec.image_key) or (next(iter(data.values())) if len(data) == 1 else None)
    if not url:
        raise ValueError(f"no image under data[{spec.image_key!r}]")
    if not isinstance(url, str):
        raise ValueError(f"data[{spec.image_key!r}] is a {type(url).__name__}, not a URL or path")
    return url


def task_name(task: Any) -> str:
    task_id = task.get("id") if isinstance(task, dict) else None
    return str(task_id)[:40] if isinstance(task_id, int | str) else "?"


class BatchPredictor:
    """Runs the batches of every request with the same sources, limits and prediction lock."""

    def __init__(self, sources: ImageSources, limits: ServingLimits, lock: FairLock) -> None:
        self.sources = sources
        self.limits = limits
        self.lock = lock

    def run(
        self,
        tasks: list[Any],
        model: Any,
        spec: ControlSpec,
        label_studio: LabelStudioOrigin,
        render: Render,
        project: str = "?",
    ) -> list[dict[str, Any] | None]:
        """One rendered answer per task, ``None`` where that task failed (its reason is logged)."""
        limits = self.limits
        request_deadline = time.monotonic() + limits.predict_timeout
        answers: list[dict[str, Any] | None] = [None] * len(tasks)
        references: dict[int, str] = {}
        for index, task in enumerate(tasks):
            try:
                references[index] = image_reference(task, spec)
            except ValueError as error:
                logger.error("project %s task %s: %s", project, task_name(task), error)
        order = list(references)
        if not order:
            return answers
        pool = ThreadPoolExecutor(
            max_workers=min(limits.image_fetch_threads, len(order)), thread_name_prefix="image-fetch"
        )
        pending: dict[int, tuple[Future[bytes], Fetch]] = {}
        lookahead = 2 * max(limits.image_fetch_threads, limits.predict_chunk)
        submitted = 0
        try:
            for start in range(0, len(order), limits.predict_chunk):
                while submitted < len(order) and submitted < start + lookahead:
                    index = order[submitted]
                    handle = Fetch()
                    future = pool.submit(
                        self._fetch, references[index], label_studio, handle, request_deadline
                    )
                    pending[index] = (future, handle)
                    submitted += 1
                chunk = order[start : start + limits.predict_chunk]
                if time.monotonic() >= request_deadline:
                    logger.error(
                        "project %s: PREDICT_TIMEOUT=%.0fs reached, %d task(s) answered empty",
                        project,
                        limits.predict_timeout,
                        len(order) - start,
                    )
                    break
                images: dict[int, Any] = {}
                for index in chunk:
                    future, handle = pending.pop(index)
                    image = self._image(future, handle, request_deadline)
                    if isinstance(image, str):
                        logger.error(
                            "project %s task %s (%s): %s",
                            project,
                            task_name(tasks[index]),
                            describe(references[index]),
                            image,
                        )
                    else:
                        images[index] = image
                for index, answer in self._predict(images, model, render, tasks, project).items():
                    answers[index] = answer
        finally:
            for future, handle in pending.values():
                future.cancel()
                handle.abort()
            pool.shutdown(wait=False, cancel_futures=True)
        return answers

    def _fetch(
        self, reference: str, label_studio: LabelStudioOrigin, handle: Fetch, request_deadline: float
    ) -> bytes:
        handle.started = time.monotonic()
        deadline = min(handle.started + self.limits.image_fetch_timeout, request_deadline)
        data = self.sources.fetch(reference, label_studio, deadline, handle)
        image_size(data, self.limits.max_image_pixels)  # the header only: refuse a bomb before decoding
        return data

    def _image(self, future: Future[bytes], handle: Fetch, request_deadline: float) -> Any:
        """The decoded image, or the reason (a str) it is missing; waits no longer than its deadline."""
        while True:
            now = time.monotonic()
            limit = request_deadline
            if handle.started is not None:
                limit = min(limit, handle.started + self.limits.image_fetch_timeout)
            if now >= limit and not future.done():  # a fetch done in time counts, however late we look
                future.cancel()
                handle.abort()
                if limit == request_deadline:
                    return f"request deadline passed (PREDICT_TIMEOUT={self.limits.predict_timeout:g}s)"
                return f"fetch deadline passed (IMAGE_FETCH_TIMEOUT={self.limits.image_fetch_timeout:g}s)"
            try:
                data = future.result(timeout=max(0.0, min(limit - now, 0.25)))
                break
            except FutureTimeout:
                continue
            except (ImageRefused, ImageFetchError, ImageLoadError) as error:
                return f"{type(error).__name__}: {error}"
            except Exception as error:  # one bad task never fails the batch
                return f"unexpected {type(error).__name__}: {error}"
        try:
            return load_image(data, max_pixels=self.limits.max_image_pixels)
        except ImageLoadError as error:
            return f"{type(error).__name__}: {error}"
        except (MemoryError, Exception) as error:
            return f"cannot decode: {type(error).__name__}: {error}"

    def _predict(
        self, images: dict[int, Any], model: Any, render: Render, tasks: list[Any], project: str
    ) -> dict[int, dict[str, Any] | None]:
        """One chunk under the prediction lock; on an unexpected error, each image again on its own."""
        if not images:
            return {}
        indices = list(images)
        with self.lock:
            try:
                predictions = list(model.predict([images[i] for i in indices]))
            except Exception as error:
                logger.warning(
                    "project %s: chunk failed (%s), predicting its images one by one", project, error
                )
                predictions = []
                for i in indices:
                    try:
                        predictions.append(model.predict([images[i]])[0])
                    except Exception as single:
                        predictions.append(single)
        answers: dict[int, dict[str, Any] | None] = {}
        for index, prediction in zip(indices, predictions, strict=True):
            reason = prediction if isinstance(prediction, Exception) else getattr(prediction, "error", None)
            answer = None
            if reason is None:
                try:
                    answer = render(prediction)
                except Exception as error:
                    reason = f"cannot render the prediction: {type(error).__name__}: {error}"
            if reason is not None:
                logger.error("project %s task %s: %s", project, task_name(tasks[index]), reason)
            answers[index] = answer
        return answers

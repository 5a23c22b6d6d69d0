"""Keep every Label Studio project showing its current version, whoever made it current.

A retrain job, ``promote``/``rollback`` from the CLI or over HTTP, or a restart: all of them only move
the store's ``current`` pointer. The backend already follows that pointer per request; this thread
follows it too and, when a Label Studio project's current version is not yet shown there, asks Label
Studio for the new predictions (:func:`~defect_assist.label_studio.version_sync.show_version`). It is a
reconciler, so it is restart-safe: on start it checks every project once and only fills what is
missing, and tasks imported later (``TASKS_CREATED``) are filled the same way. Projects whose name is
not a Label Studio id (``demo``) are skipped; a project without a
connected backend, or Label Studio down, is retried with a backoff.

Someone pressing *Retrieve predictions* while the sync asks for the same tasks makes Label Studio store
two predictions of the version on them, possibly after the sync looked; so once a version is shown and
the project's ``/predict`` calls have been quiet for ``settle`` seconds (:class:`ProjectActivity`), the
sync looks once more and removes the duplicates
(:func:`~defect_assist.label_studio.version_sync.remove_duplicates`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from defect_assist.core.store import ModelStore
from defect_assist.label_studio.client import LabelStudioClient, LabelStudioError
from defect_assist.label_studio.version_sync import (
    NoBackendConnected,
    VersionShown,
    remove_duplicates,
    show_version,
)

logger = logging.getLogger(__name__)

ClientFor = Callable[[str], LabelStudioClient | None]
SETTLE_TRIES = 10  # duplicates found again and again: someone keeps retrieving; stop looking


class ProjectActivity:
    """Which projects' ``/predict`` calls are running, and when each project's last one ended."""

    def __init__(self, capacity: int = 1000) -> None:
        self.capacity = max(1, capacity)
        self._running: dict[str, int] = {}
        self._ended: OrderedDict[str, float] = OrderedDict()  # bounded: the most recent projects
        self._lock = threading.Lock()

    @contextmanager
    def predicting(self, project: str) -> Iterator[None]:
        with self._lock:
            self._running[project] = self._running.get(project, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._running[project] -= 1
                if not self._running[project]:
                    del self._running[project]
                self._ended[project] = time.monotonic()
                self._ended.move_to_end(project)
                while len(self._ended) > self.capacity:
                    self._ended.popitem(last=False)

    def idle_for(self, project: str) -> float:
        """Seconds since the project's last ``/predict`` ended: 0 while one runs, inf if none did."""
        with self._lock:
            if project in self._running:
                return 0.0
            ended = self._ended.get(project)
        return float("inf") if ended is None else time.monotonic() - ended


class LabelStudioSync:
    """Background reconciler: store ``current`` → Label Studio predictions, score column, model card."""

    def __init__(
        self,
        store: ModelStore,
        client_for: ClientFor,
        interval: float = 2.0,
        batch_size: int = 16,
        retry_after: float = 30.0,
        idle_for: Callable[[str], float] | None = None,
        settle: float = 5.0,
    ) -> None:
        self.store = store
        self.client_for = client_for
        self.interval = interval
        self.batch_size = batch_size
        self.retry_after = retry_after
        self.idle_for = idle_for or (lambda _: float("inf"))
        self.settle = settle
        self._settling: dict[str, tuple[str, float, int]] = {}  # project → (version, shown at, tries)
        self.shown: dict[str, str] = {}  # project → version shown in Label Studio
        self.last: dict[str, VersionShown] = {}
        self._retry_at: dict[str, float] = {}
        self._requests: dict[str, int] = {}  # refresh() calls per project: one during a pass is not lost
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="label-studio-sync", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def poke(self, project: str) -> None:
        """Re-check ``project`` now (Label Studio just called ``/setup``: a backend may be connected)."""
        self._retry_at.pop(project, None)
        self._wake.set()

    def refresh(self, project: str) -> None:
        """Check ``project``'s tasks again now (tasks were imported: they lack predictions)."""
        self._requests[project] = self._requests.get(project, 0) + 1
        self.shown.pop(project, None)
        self.poke(project)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.reconcile()
            self._wake.wait(self.interval)
            self._wake.clear()

    def reconcile(self) -> list[VersionShown]:
        """One pass over the store's projects; returns what was shown in this pass."""
        self._remove_duplicates()
        done = []
        for project in self.store.projects():
            if not project.isdigit() or self._stop.is_set():
                continue
            version = self.store.current_version(project)
            if version is None or self.shown.get(project) == version:
                continue
            if time.monotonic() < self._retry_at.get(project, 0.0):
                continue
            client = self.client_for(project)
            if client is None:
                continue
            shown = self._show(client, project, version)
            if shown is not None:
                done.append(shown)
        return done

    def _show(self, client: LabelStudioClient, project: str, version: str) -> VersionShown | None:
        own = [v.version for v in self.store.versions(project)]
        requests = self._requests.get(project, 0)
        try:
            shown = show_version(client, project, version, own, batch_size=self.batch_size)
        except NoBackendConnected:
            self._retry_at[project] = time.monotonic() + self.retry_after
            return None
        except LabelStudioError as error:
            logger.warning("project %s: cannot show %s in Label Studio yet: %s", project, version, error)
            self._retry_at[project] = time.monotonic() + self.retry_after
            return None
        self.last[project] = shown
        if shown.missing:
            logger.warning(
                "project %s: %d task(s) still lack a %s prediction", project, shown.missing, version
            )
            self._retry_at[project] = time.monotonic() + self.retry_after
        elif self._requests.get(project, 0) == requests:  # no tasks imported meanwhile
            self.shown[project] = version
            self._settling[project] = (version, time.monotonic(), 0)
        return shown

    def _remove_duplicates(self) -> None:
        """Shown versions whose project's ``/predict`` calls have settled: remove duplicates, once."""
        for project, (version, shown_at, tries) in list(self._settling.items()):
            if self._stop.is_set():
                return
            if self.shown.get(project) != version:  # a newer version, or tasks imported: shown again
                self._settling.pop(project, None)
                continue
            idle = self.idle_for(project)  # 0 while a /predict of the project runs
            if idle <= 0.0 or min(time.monotonic() - shown_at, idle) < self.settle:
                continue
            client = self.client_for(project)
            try:
                deleted = remove_duplicates(client, project, version) if client is not None else 0
            except LabelStudioError as error:
                logger.warning("project %s: cannot check for duplicate predictions: %s", project, error)
                deleted = 1
            if deleted and tries + 1 < SETTLE_TRIES:
                self._settling[project] = (version, time.monotonic(), tries + 1)  # look again later
            else:
                self._settling.pop(project, None)

"""Embedded Qdrant storage shared by the processes of one machine: open per operation, wait, name the holder.

qdrant-client's local mode locks its storage folder to one client (one process) while it is open, so
the similarity index (:class:`~defect_assist.similarity.index.SimilarityIndex`) and the FiftyOne
brain backend (:mod:`defect_assist.explore.qdrant_backend`) open the folder through
:class:`LocalStorage` **per operation** and close it again (a
:meth:`~defect_assist.similarity.index.SimilarityIndex.session` groups several operations under one
opening). A process that finds the folder held waits up to ``wait_s`` (default :data:`LOCK_WAIT_S`)
for it, then raises :class:`IndexBusyError` naming the process that holds it (read from
``/proc/locks``). Threads of one process share one opening (in turn). A Qdrant server has no such
rule: use ``QDRANT_URL`` for large indexes or many concurrent users.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

from qdrant_client import QdrantClient

LOCK_WAIT_S = 30.0  # how long an operation waits for embedded storage another process holds


class IndexBusyError(RuntimeError):
    """The embedded storage stayed held by another process (or client) for longer than the wait."""


def lock_holder(path: str | Path) -> str:
    """Who holds the lock of embedded Qdrant storage ``path``: ``pid N (command line)``, from /proc/locks."""
    lock = Path(path) / ".lock"
    try:
        stat = lock.stat()
        device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
        pids = [
            int(parts[4])
            for line in Path("/proc/locks").read_text().splitlines()
            if len(parts := line.split()) > 5 and parts[5] == device and parts[4].isdigit()
        ]
    except (OSError, ValueError):
        pids = []
    if not pids:
        return "another process"
    pid = pids[0]
    if pid == os.getpid():
        return f"this process (pid {pid}: another Qdrant client left open on the folder)"
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        command = ""
    command = " ".join(command.split())
    if len(command) > 160:
        command = command[:157] + "..."
    return f"pid {pid} ({command})" if command else f"pid {pid}"


class LocalStorage:
    """One embedded Qdrant folder, opened for a group of operations and closed after it.

    One instance per folder and process (:meth:`at`): threads take turns (a re-entrant lock), nested
    openings in one thread share the client, and another process holding the folder is waited for.
    """

    _instances: ClassVar[dict[Path, LocalStorage]] = {}
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._client: QdrantClient | None = None
        self._depth = 0

    @classmethod
    def at(cls, path: str | Path) -> LocalStorage:
        """The storage object of folder ``path`` in this process."""
        key = Path(path).expanduser().resolve()
        with cls._guard:
            if key not in cls._instances:
                cls._instances[key] = cls(key)
            return cls._instances[key]

    @contextmanager
    def open(self, wait_s: float = LOCK_WAIT_S) -> Iterator[QdrantClient]:
        """A client on the folder, waiting up to ``wait_s`` for another holder; closed on exit."""
        deadline = time.monotonic() + wait_s
        if not self._lock.acquire(timeout=max(wait_s, 0.0)):
            raise IndexBusyError(
                f"the similarity index storage {self.path} stayed in use by another thread of this "
                f"process (pid {os.getpid()}) for {wait_s:.0f} s"
            )
        try:
            if self._client is None:
                self._client = self._connect(deadline, wait_s)
            self._depth += 1
            try:
                yield self._client
            finally:
                self._depth -= 1
                if self._depth == 0:
                    client, self._client = self._client, None
                    client.close()
        finally:
            self._lock.release()

    def _connect(self, deadline: float, wait_s: float) -> QdrantClient:
        self.path.mkdir(parents=True, exist_ok=True)
        delay = 0.05
        while True:
            try:
                return QdrantClient(path=str(self.path))
            except RuntimeError as error:
                if "already accessed" not in str(error):
                    raise
                if time.monotonic() + delay > deadline:
                    raise IndexBusyError(
                        f"the similarity index storage {self.path} is held by {lock_holder(self.path)} "
                        f"(waited {wait_s:.0f} s). Embedded Qdrant admits one process at a time per "
                        "folder: retry when that process is done, or run a Qdrant server and set "
                        "QDRANT_URL to share the index between processes."
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

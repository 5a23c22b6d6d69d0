"""Helpers for the worker tests: a real redis-server and real worker processes (not a test module)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def wait_for(
    condition: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class WorkerProcess:
    """``python -m defect_assist_worker`` in its own session, logging to a file."""

    def __init__(self, env: dict[str, str], log: Path, name: str) -> None:
        self.env, self.log_path, self.name = env, log, name
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, burst: bool = False) -> WorkerProcess:
        command = [sys.executable, "-m", "defect_assist_worker", "--name", self.name] + (
            ["--burst"] if burst else []
        )
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["nice", "-n", "10", *command],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill9(self) -> None:
        """``kill -9`` the worker process only (its work horse must die with it)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # rq warm shutdown
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


def http_up(url: str) -> bool:
    """Whether ``url`` answers below 500."""
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


@contextmanager
def backend_and_worker(log_dir: Path, worker_name: str) -> Iterator[str]:
    """``defect-assist serve`` and one worker process with this process's environment; yields the URL."""
    from defect_assist_tools.local_label_studio import free_port

    port = str(free_port())
    with open(log_dir / "backend.log", "wb") as log:
        backend = subprocess.Popen(
            [
                *("nice", "-n", "10", sys.executable, "-m", "defect_assist_tools.cli", "serve"),
                *("--host", "127.0.0.1", "--port", port),
            ],
            env=dict(os.environ),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = WorkerProcess(dict(os.environ), log_dir / "worker.log", worker_name).start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_up(f"{url}/health"), 180, 1, "backend")
        yield url
    finally:
        worker.stop()
        backend.terminate()
        try:
            backend.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(backend.pid, signal.SIGKILL)

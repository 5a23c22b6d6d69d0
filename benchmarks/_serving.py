"""Helpers shared by the serving benchmarks (not a benchmark): a free port, the CPU's name, RSS.

- :func:`free_port`, :func:`cpu_model`, :func:`peak_rss_mb` (one process's ``VmHWM``);
- :func:`tree_rss_bytes` and :class:`RssSampler`: RSS of a process and all its children, sampled
  in a thread, the peak kept per named phase;
- :func:`cpu_seconds` and :class:`CpuMeter`: cores used by given process trees, by every other
  process on the machine, and stolen by the hypervisor, over a span (shared machines are noisy);
- :func:`start_backend`: ``defect-assist serve`` as a subprocess on a free 127.0.0.1 port.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def tree_rss_bytes(pid: int) -> int:
    """RSS of ``pid`` plus every descendant (pages shared between them are counted once per process)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += process.memory_info().rss
    return total


def cpu_seconds(pid: int, recursive: bool = True) -> float:
    """User + system CPU seconds of ``pid`` (all its threads) and, if ``recursive``, its live descendants."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)] if recursive else [root]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = process.cpu_times()
            total += times.user + times.system
    return total


class CpuMeter:
    """Cores used during a span by some process trees, by one process alone (this one, by default), by
    everything else on the machine, and stolen by the hypervisor.

    ``stop()`` returns ``{"tree_cores": [...], "self_cores", "other_cores", "steal_cores"}``: CPU seconds
    per wall second. Trees should not contain each other or ``process``.
    """

    def __init__(self, trees: tuple[int, ...] | list[int], process: int | None = None) -> None:
        self.trees, self.process = list(trees), os.getpid() if process is None else process
        self._start = self._read()

    def _read(self) -> tuple[float, float, float, list[float]]:
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        own = [cpu_seconds(pid) for pid in self.trees] + [cpu_seconds(self.process, recursive=False)]
        return time.monotonic(), busy, getattr(t, "steal", 0.0), own

    def stop(self) -> dict[str, object]:
        (t0, busy0, steal0, own0), (t1, busy1, steal1, own1) = self._start, self._read()
        wall = max(t1 - t0, 1e-9)
        used = [(b - a) / wall for a, b in zip(own0, own1, strict=True)]
        return {
            "tree_cores": [round(c, 2) for c in used[:-1]],
            "self_cores": round(used[-1], 2),
            "other_cores": round(max(0.0, (busy1 - busy0) / wall - sum(used)), 2),
            "steal_cores": round((steal1 - steal0) / wall, 2),
        }


class RssSampler:
    """Samples :func:`tree_rss_bytes` every ``interval`` s; ``peaks[phase]`` and ``last[phase]`` in MB."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval = pid, interval
        self.phase: str | None = None
        self.peaks: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def set_phase(self, phase: str | None) -> None:
        """Samples from now on count towards ``phase`` (one sample is taken at once)."""
        with self._lock:
            self.phase = phase
        self._sample()

    def _sample(self) -> None:
        mb = tree_rss_bytes(self.pid) / 2**20
        with self._lock:
            if self.phase is not None and mb > 0:
                self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), mb)
                self.last[self.phase] = mb

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()


def wait_until(condition, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}")
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_backend(
    model_dir: Path, datasets_dir: Path, log: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m defect_assist_tools serve`` on ``model_dir``, 127.0.0.1 and a free port; waits for /health.

    Local image paths under ``datasets_dir`` are served (DATASETS_DIR); Label Studio is unreachable and
    its sync off. The process logs to ``log`` and runs in its own session.
    """
    port = free_port()
    environment = {
        **os.environ,
        "MODEL_DIR": str(model_dir),
        "DEVICE": "cpu",
        "LABEL_STUDIO_URL": "http://127.0.0.1:9",
        "LABEL_STUDIO_SYNC": "false",
        "DATASETS_DIR": str(datasets_dir),
        "PYTHONWARNINGS": "ignore",
        **(env or {}),
    }
    command = [sys.executable, "-m", "defect_assist_tools", "serve", "--host", "127.0.0.1"]
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [*command, "--port", str(port), "--log-level", "warning"],
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{url}/health"), timeout, "the backend's /health", server)
    except BaseException:
        stop_process(server)
        raise
    return server, url


def stop_process(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL to its process group (started with ``start_new_session``) after ``timeout``."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

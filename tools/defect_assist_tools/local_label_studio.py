"""A real Label Studio for the embedded stack and the tests: its own venv, a cached migrated template.

:func:`ensure_label_studio` installs ``label-studio`` into ``.ls-venv`` (kept apart from the project
venv: their pins conflict), :func:`start_label_studio` runs it on 127.0.0.1 with an admin user and a
legacy API token, local-file serving on and ``ML_BLOCK_LOCAL_IP=false`` so it may call a backend on
the same machine.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from defect_assist.core.settings import PROJECT_ROOT
from defect_assist.label_studio import LABELING_CONFIG
from defect_assist.label_studio.client import LabelStudioClient

LS_VERSION = "1.23.2"
ROOT = PROJECT_ROOT
LS_VENV = Path(os.environ.get("LABEL_STUDIO_VENV", ROOT / ".ls-venv"))
DATASETS = Path(os.environ.get("DATASETS_DIR", ROOT.parent / "shared" / "datasets"))
CONFIG = LABELING_CONFIG  # the recommended labeling config
USER, PASSWORD, TOKEN = "admin@example.com", "defect-assist-e2e", "0123456789abcdef0123456789abcdef01234567"


def _lock_file(what: str = "template") -> Path:
    """Lock serialising the venv install (``install``) or the template build between parallel sessions."""
    path = ROOT / "var" / f"ls-venv-{what}.lock"  # var/ is git-ignored
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def ensure_label_studio(venv: Path = LS_VENV) -> Path:
    """The ``label-studio`` executable, installing it into ``venv`` once (file-locked, ~90 s)."""
    executable = venv / "bin" / "label-studio"
    if executable.exists():
        return executable
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(_lock_file("install"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not executable.exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run(
                [str(venv / "bin" / "pip"), "install", "-q", f"label-studio=={LS_VERSION}"],
                check=True,
                timeout=1200,
            )
    return executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LabelStudioServer:
    """A running Label Studio with an admin user and its legacy API token."""

    url: str
    token: str
    data_dir: Path
    log_file: Path
    process: subprocess.Popen | None = None
    client: LabelStudioClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = LabelStudioClient(self.url, self.token, timeout=120.0)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_file.read_text(errors="replace")[-chars:] if self.log_file.exists() else ""

    def create_project(self, title: str, label_config: str) -> int:
        return int(self.client.post("/api/projects", {"title": title, "label_config": label_config})["id"])

    def import_local_files(self, project: int, folder: Path, regex: str | None = None) -> int:
        """Local-files import storage on ``folder`` (recursive, optional file-name regex), synced."""
        storage = self.client.post(
            "/api/storages/localfiles",
            {
                "project": project,
                "path": str(folder),
                "use_blob_urls": True,
                "recursive_scan": True,
                "regex_filter": regex or "",
                "title": folder.name,
            },
        )
        self.client.post(f"/api/storages/localfiles/{storage['id']}/sync")
        for _ in range(120):
            if self.client.get(f"/api/storages/localfiles/{storage['id']}").get("status") in (
                "completed",
                "failed",
            ):
                break
            time.sleep(0.5)
        return int(storage["id"])

    def connect_backend(
        self, project: int, url: str, title: str = "defect-assist", **extra: Any
    ) -> dict[str, Any]:
        return self.client.post("/api/ml", {"project": project, "url": url, "title": title, **extra})

    def retrieve_predictions(self, project: int) -> Any:
        """The Data Manager action "Retrieve predictions" on all tasks (LS calls /setup then /predict)."""
        return self.client.retrieve_predictions(project)

    def tasks(self, project: int) -> list[dict[str, Any]]:
        return self.client.tasks(project)

    def predictions(self, task: int) -> list[dict[str, Any]]:
        answer = self.client.get("/api/predictions/", task=task)
        return answer if isinstance(answer, list) else answer.get("results", [])


def _wait_until_up(server: LabelStudioServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            raise RuntimeError(f"label-studio exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if (
                httpx.get(f"{server.url}/health", timeout=2).status_code == 200
                and httpx.get(
                    f"{server.url}/api/projects",
                    headers={"Authorization": f"Token {server.token}"},
                    timeout=5,
                ).status_code
                == 200
            ):
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"label-studio did not come up in {timeout:.0f}s:\n{server.log_tail()}")


def start_label_studio(
    executable: Path, home: Path, data_dir: Path, port: int, log_file: Path, document_root: Path = DATASETS
) -> LabelStudioServer:
    """Start ``label-studio`` and wait until its API answers with the admin token."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_"))},
        "HOME": str(home),
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "SENTRY_DSN": "",  # offline: no error reports to Sentry (LS's default DSN), server or browser
        "FRONTEND_SENTRY_DSN": "",
        "PYTHONUNBUFFERED": "1",
    }
    server = LabelStudioServer(f"http://127.0.0.1:{port}", TOKEN, data_dir, log_file)
    command = [
        str(executable),
        "start",
        "--no-browser",
        "--internal-host",
        "127.0.0.1",
        "-p",
        str(port),
        "--username",
        USER,
        "--password",
        PASSWORD,
        "--user-token",
        TOKEN,
        "--enable-legacy-api-token",
    ]
    with open(log_file, "ab") as log:
        server.process = subprocess.Popen(
            command, env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_until_up(server, timeout=300)
    except BaseException:
        stop_label_studio(server)
        raise
    return server


def stop_label_studio(server: LabelStudioServer) -> None:
    """Terminate the server's process group (SIGTERM, then SIGKILL)."""
    server.client.close()
    if server.process is None or server.process.poll() is not None:
        return
    try:
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
    except ProcessLookupError:
        pass


def template_data_dir(executable: Path) -> Path:
    """A migrated, empty data dir (admin user and token only), made once per LS version and cached.

    A first start of a data dir runs all migrations (~30 s idle, 2–3 min on a busy 2-core box);
    each session copies this template into a fresh data dir instead (start ~5–15 s).
    """
    template = LS_VENV / f"template-data-{LS_VERSION}"
    if (template / "label_studio.sqlite3").exists():
        return template
    with open(_lock_file(), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (template / "label_studio.sqlite3").exists():
            building = template.with_name(f".{template.name}.building")
            shutil.rmtree(building, ignore_errors=True)
            (building / "home").mkdir(parents=True)
            server = start_label_studio(
                executable, building / "home", building / "data", free_port(), building / "log"
            )
            stop_label_studio(server)
            shutil.rmtree(template, ignore_errors=True)
            os.rename(building / "data", template)
            shutil.rmtree(building, ignore_errors=True)
    return template

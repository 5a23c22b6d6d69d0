"""The embedded single-machine stack: Redis, a retrain worker, the ML backend and (when set up) Label Studio.

``defect-assist stack`` starts each part as a child process with logs under ``var/stack/logs``, makes
sure the project has a model (the first one is trained by the worker from the sample normals, the way
any retrain runs), checks that ``/predict`` answers for a normal and a defective sample image, prints
where everything listens and keeps running until Ctrl-C (``--smoke``: exit after the check).

Label Studio runs when its venv (``.ls-venv``) is present or ``--label-studio`` asks to install it: it
gets a persistent data dir ``var/stack/label-studio``, a demo project of sample test images served as local
files, and our backend connected as its ML backend; the model store project is then the LS project id.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from defect_assist.core.settings import PROJECT_ROOT, Settings

DEMO_TITLE = "defect-assist demo"


@dataclass
class StackOptions:
    data: Path
    project: str = "demo"
    backend_port: int = 9090
    label_studio: bool | None = None  # None = when installed
    label_studio_port: int = 8080
    tasks: int = 24
    max_train: int | None = None
    smoke: bool = False
    state_dir: Path = PROJECT_ROOT / "var" / "stack"


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass(frozen=True)
class SampleImages:
    """Training normals, test normals and test defects of the sample data."""

    train: list[Path]
    normals: list[Path]
    defects: list[Path]


@dataclass
class Stack:
    """The running parts; :meth:`close` stops them in reverse order."""

    settings: Settings
    options: StackOptions
    samples: SampleImages
    children: list[Child] = field(default_factory=list)
    redis_server: Any = None
    label_studio: Any = None
    project: str = ""
    lines: list[str] = field(default_factory=list)

    def say(self, message: str) -> None:
        print(f"[stack] {message}", flush=True)

    # ------------------------------------------------------------------ processes
    def spawn(self, name: str, command: list[str], env: dict[str, str]) -> Child:
        logs = self.options.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.log"
        with open(log, "ab") as handle:
            process = subprocess.Popen(
                command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )
        child = Child(name, process, log)
        self.children.append(child)
        return child

    def check_children(self) -> None:
        for child in self.children:
            if child.process.poll() is not None:
                tail = child.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(
                    f"{child.name} exited with {child.process.returncode}; log {child.log}:\n{tail}"
                )

    def close(self) -> None:
        for child in reversed(self.children):
            if child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGTERM)
                try:
                    child.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.process.pid, signal.SIGKILL)
                    child.process.wait(timeout=10)
        self.children.clear()
        if self.label_studio is not None:
            from defect_assist_tools.local_label_studio import stop_label_studio

            stop_label_studio(self.label_studio)
            self.label_studio = None
        if self.redis_server is not None:
            self.redis_server.stop()
            self.redis_server = None


def sample_images(data: Path) -> SampleImages:
    """Read an MVTec-layout category (the evaluation's reader), or a plain folder of normals."""
    from defect_assist.core.evaluation import list_images, load_category

    if not (data / "train" / "good").is_dir():
        train = list_images(data) if data.is_dir() else []
        if not train:
            raise FileNotFoundError(f"no training images in {data}/train/good or {data}")
        return SampleImages(train, [], [])
    category = load_category(data)
    normals = [t.path for t in category.test if not t.is_anomalous]
    defects = [t.path for t in category.test if t.is_anomalous]
    return SampleImages(category.train, normals, defects)


def _spread(items: list[Path], count: int) -> list[Path]:
    if count <= 0 or not items:
        return []
    step = max(1, len(items) // count)
    return items[::step][:count]


def _wait_http(url: str, timeout: float, stack: Stack, auth: tuple[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check_children()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2, auth=auth).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def _start_label_studio(stack: Stack) -> None:
    from defect_assist_tools.local_label_studio import (
        CONFIG,
        ensure_label_studio,
        start_label_studio,
        template_data_dir,
    )

    options = stack.options
    stack.say("starting Label Studio (first start of a data dir: ~30 s)")
    executable = ensure_label_studio()
    home = options.state_dir / "label-studio"
    data_dir = home / "data"
    if not (data_dir / "label_studio.sqlite3").exists():
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.copytree(template_data_dir(executable), data_dir)
    document_root = options.data.resolve().parent
    server = start_label_studio(
        executable, home, data_dir, options.label_studio_port, home / "label-studio.log", document_root
    )
    stack.label_studio = server
    client = server.client
    projects = client.get("/api/projects", page_size=1000)
    projects = projects.get("results", projects) if isinstance(projects, dict) else projects
    existing = next((p for p in projects if p.get("title") == DEMO_TITLE), None)
    if existing is None:
        project = server.create_project(DEMO_TITLE, CONFIG.read_text())
        samples = stack.samples
        half = options.tasks // 2
        picked = _spread(samples.normals, half) + _spread(samples.defects, options.tasks - half)
        regex = "^(" + "|".join(p.name.replace(".", r"\.") for p in picked) + ")$"
        server.import_local_files(project, options.data.resolve() / "test", regex)
        stack.say(f"created Label Studio project {project} with {len(server.tasks(project))} tasks")
    else:
        project = int(existing["id"])
    stack.project = str(project)


def _connect_backend(stack: Stack, backend_url: str) -> None:
    server = stack.label_studio
    project = int(stack.project)
    connected = server.client.get("/api/ml", project=project)
    if not any(str(ml.get("url", "")).rstrip("/") == backend_url for ml in connected):
        server.connect_backend(project, backend_url, title="defect-assist")
    server.retrieve_predictions(project)
    predicted = sum(1 for task in server.tasks(project) if server.predictions(task["id"]))
    stack.lines.append(f"Label Studio project {project}: {predicted} task(s) carry predictions")


def _ensure_model(stack: Stack, redis_url: str) -> str:
    import redis
    from rq.job import Job, JobStatus

    from defect_assist.core.store import ModelStore
    from defect_assist_worker.triggers import request_retrain

    store = ModelStore(stack.settings.model_dir)
    current = store.current_version(stack.project)
    if current:
        stack.say(f"project {stack.project}: serving {current}")
        return current
    train = stack.samples.train
    if stack.options.max_train:
        train = _spread(train, stack.options.max_train)
    connection = redis.Redis.from_url(redis_url)
    answer = request_retrain(
        stack.project, "stack: first model", images=[str(p) for p in train], connection=connection
    )
    stack.say(f"project {stack.project} has no model: retrain job {answer['job_id']} on {len(train)} normals")
    last = ""
    while True:
        stack.check_children()
        job = Job.fetch(answer["job_id"], connection=connection)
        status = job.get_status()
        line = f"{status.value} {job.meta.get('stage', '')} {job.meta.get('percent', 0):.0f}%"
        if line != last:
            stack.say(line)
            last = line
        if status == JobStatus.FINISHED:
            break
        if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
            raise RuntimeError(f"first training failed: {job.meta.get('error') or job.exc_info}")
        time.sleep(1)
    version = store.current_version(stack.project)
    if not version:
        raise RuntimeError("the retrain job finished without publishing a version")
    return version


def _smoke_predict(stack: Stack, backend_url: str) -> None:
    """One normal and one defective sample through ``/predict`` (with the recommended labeling config)."""
    from defect_assist_tools.local_label_studio import CONFIG

    samples = _spread(stack.samples.normals, 1) + _spread(stack.samples.defects, 1)
    if not samples:
        return
    tasks = [{"id": i + 1, "data": {"image": str(p.resolve())}} for i, p in enumerate(samples)]
    answer = (
        httpx.post(
            f"{backend_url}/predict",
            json={"tasks": tasks, "project": stack.project, "label_config": CONFIG.read_text()},
            timeout=300,
        )
        .raise_for_status()
        .json()
    )
    for path, result in zip(samples, answer["results"], strict=True):
        stack.lines.append(
            f"/predict {path.parent.name}/{path.name}: score {result.get('score', float('nan')):.3f} "
            f"({result.get('model_version')})"
        )


def run_stack(options: StackOptions) -> int:
    """Start the stack, check it, then wait for Ctrl-C (or return at once with ``options.smoke``)."""
    from defect_assist_worker.redis_server import RedisServer

    settings = Settings()
    stack = Stack(settings, options, sample_images(options.data), project=options.project)
    options.state_dir.mkdir(parents=True, exist_ok=True)
    interrupted = False

    def on_signal(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        if settings.redis_url:
            redis_url = settings.redis_url
        else:
            server = RedisServer(settings.redis_data_dir)
            redis_url = server.running_url() or ""
            if not redis_url:
                redis_url = server.start(detach=False)
                stack.redis_server = server
        stack.say(f"redis: {redis_url}")

        backend_url = f"http://127.0.0.1:{options.backend_port}"
        use_ls = options.label_studio
        if use_ls is None:
            use_ls = (PROJECT_ROOT / ".ls-venv" / "bin" / "label-studio").exists()
        if use_ls:
            _start_label_studio(stack)

        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "MODEL_DIR": str(settings.model_dir),
            "PYTHONUNBUFFERED": "1",
        }
        if stack.label_studio is not None:
            env.update(
                LABEL_STUDIO_URL=stack.label_studio.url,
                LABEL_STUDIO_API_KEY=stack.label_studio.token,
                LOCAL_FILES_DOCUMENT_ROOT=str(options.data.resolve().parent),
            )
        stack.spawn("worker", [sys.executable, "-m", "defect_assist_worker", "--name", "stack-worker"], env)
        stack.spawn(
            "backend",
            [
                sys.executable,
                "-m",
                "defect_assist_tools",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(options.backend_port),
            ],
            env,
        )
        stack.say("worker and backend starting")
        version = _ensure_model(stack, redis_url)
        _wait_http(f"{backend_url}/health", 120, stack)
        _smoke_predict(stack, backend_url)
        if stack.label_studio is not None:
            _connect_backend(stack, backend_url)

        print("\ndefect-assist stack is up", flush=True)
        print(f"  model          project {stack.project}, version {version} ({settings.model_dir})")
        print(f"  ML backend     {backend_url}  (/health /setup /predict /webhook /versions /retrain /jobs)")
        print(f"  redis + worker {redis_url}, queue defect-assist-retrain  (defect-assist jobs)")
        if stack.label_studio is not None:
            from defect_assist_tools.local_label_studio import PASSWORD, USER

            print(f"  Label Studio   {stack.label_studio.url}  (login {USER} / {PASSWORD})")
        print(f"  logs           {options.state_dir / 'logs'}")
        for line in stack.lines:
            print(f"  {line}")
        sys.stdout.flush()
        if not options.smoke:
            print("Ctrl-C stops everything.", flush=True)
            while True:
                stack.check_children()
                time.sleep(2)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stack.say("stopping")
        stack.close()
    return 130 if interrupted and not options.smoke else 0

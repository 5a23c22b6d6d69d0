"""The embedded single-machine stack: Redis, a retrain worker, the ML backend and Label Studio.

``defect-assist stack`` starts each part as a child process with logs under ``var/stack/logs``, makes
sure the project has a model (the first one is trained by the worker from the sample normals, the way
any retrain runs), checks that ``/predict`` answers for a normal and a defective sample image, prints
where everything listens and keeps running until Ctrl-C (``--smoke``: exit after the check).

Label Studio (installed into ``.ls-venv`` on the first run; ``--no-label-studio`` skips it) gets a
persistent data dir ``var/stack/label-studio``, a demo project of sample test images served as local
files and our backend connected as its ML backend (:mod:`defect_assist_tools.stack_label_studio`); the
model store project is then the LS project id.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from defect_assist.core.settings import PROJECT_ROOT, Settings
from defect_assist_tools.stack_label_studio import connect_backend, spread, start_demo_label_studio


@dataclass
class StackOptions:
    data: Path
    project: str = "0"  # Label Studio off; with it, the demo project's id
    backend_port: int = 9090
    label_studio: bool = True
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
    @property
    def log_dir(self) -> Path:
        """Where every part logs (``var/stack/logs``): the console stays for progress and URLs."""
        logs = self.options.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        return logs

    def spawn(self, name: str, command: list[str], env: dict[str, str]) -> Child:
        log = self.log_dir / f"{name}.log"
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


def _wait_http(url: str, timeout: float, stack: Stack, auth: tuple[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check_children()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2, auth=auth).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def _recover_interrupted_jobs(stack: Stack, redis_url: str) -> None:
    """Re-queue retrain jobs a killed stack left "started" before the worker (or a new request) runs:
    the first model's job is then found queued and waited for, never requested twice."""
    import redis

    from defect_assist_worker.worker import recover_abandoned

    recovered = recover_abandoned(redis.Redis.from_url(redis_url))
    if recovered:
        stack.say(f"re-queued {len(recovered)} retrain job(s) interrupted when the stack last stopped")


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
        train = spread(train, stack.options.max_train)
    connection = redis.Redis.from_url(redis_url)
    answer = request_retrain(
        stack.project, "stack: first model", images=[str(p) for p in train], connection=connection
    )
    if answer["status"] == "queued":
        job, count = answer["job_id"], len(train)
        stack.say(f"project {stack.project} has no model: retrain job {job} on {count} normals")
    else:  # the job an interrupted run started
        stack.say(f"project {stack.project} has no model: waiting for retrain job {answer['job_id']}")
    with StageProgress(stack.say) as bar:
        while True:
            stack.check_children()
            job = Job.fetch(answer["job_id"], connection=connection)
            status = job.get_status()
            bar.update(str(job.meta.get("stage") or status.value), float(job.meta.get("percent") or 0.0))
            if status == JobStatus.FINISHED:
                break
            if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                raise RuntimeError(f"first training failed: {job.meta.get('error') or job.exc_info}")
            time.sleep(1)
    version = store.current_version(stack.project)
    if not version:
        raise RuntimeError("the retrain job finished without publishing a version")
    return version


class StageProgress:
    """The first training's progress: one live bar on a terminal, otherwise one line per stage."""

    def __init__(self, say: Any) -> None:
        self.say = say
        self.stage = ""
        self.started = time.monotonic()
        self.live = sys.stdout.isatty()
        self.progress: Any = None

    def __enter__(self) -> StageProgress:
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            columns = (TextColumn("[stack] {task.description}"), BarColumn(), TimeElapsedColumn())
            self.progress = Progress(*columns)
            self.progress.start()
            self.task = self.progress.add_task("first model", total=100)
        return self

    def update(self, stage: str, percent: float) -> None:
        if self.live:
            self.progress.update(self.task, description=f"first model: {stage}", completed=percent)
        elif stage != self.stage:
            self.say(f"first model: {stage} ({percent:.0f}%, {time.monotonic() - self.started:.0f} s)")
        self.stage = stage

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.say(f"first model trained in {time.monotonic() - self.started:.0f} s")


def _smoke_predict(stack: Stack, backend_url: str) -> None:
    """One normal and one defective sample through ``/predict`` (with the recommended labeling config)."""
    from defect_assist_tools.local_label_studio import CONFIG

    samples = spread(stack.samples.normals, 1) + spread(stack.samples.defects, 1)
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
        if not isinstance(result, dict):  # that image failed: the backend's log says why
            stack.lines.append(f"/predict {path.parent.name}/{path.name}: no prediction (see backend.log)")
            continue
        choices = [r["value"]["choices"][0] for r in result.get("result", []) if r.get("type") == "choices"]
        stack.lines.append(
            f"/predict {path.parent.name}/{path.name}: score {result.get('score', float('nan')):.3f}, "
            f"{choices[0] if choices else 'no verdict'} ({result.get('model_version')}; anomalous from 0.5)"
        )


def child_env(settings: Settings, options: StackOptions, redis_url: str, label_studio: Any) -> dict[str, str]:
    """The worker's and the backend's environment. The backend reads images only from its local roots
    (docs/reliability.md), so ``IMAGE_LOCAL_ROOTS`` gains the ``--data`` folder the smoke check's
    samples come from, wherever it is; with Label Studio, its local-files root is the folder above."""
    data = options.data.resolve()
    roots = [r for r in settings.image_local_roots.split(os.pathsep) if r.strip()]
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "MODEL_DIR": str(settings.model_dir),
        "PYTHONUNBUFFERED": "1",
        "IMAGE_LOCAL_ROOTS": os.pathsep.join(dict.fromkeys([*roots, str(data)])),
    }
    if label_studio is not None:
        env.update(
            LABEL_STUDIO_URL=label_studio.url,
            LABEL_STUDIO_API_KEY=label_studio.token,
            LOCAL_FILES_DOCUMENT_ROOT=str(data.parent),
        )
    return env


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
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
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
        _recover_interrupted_jobs(stack, redis_url)

        backend_url = f"http://127.0.0.1:{options.backend_port}"
        if options.label_studio:
            start_demo_label_studio(stack)

        env = child_env(settings, options, redis_url, stack.label_studio)
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
            connect_backend(stack, backend_url, version)

        print("\ndefect-assist stack is up", flush=True)
        print(f"  model          project {stack.project}, version {version} ({settings.model_dir})")
        print(f"  ML backend     {backend_url}  (/health /setup /predict /webhook /versions /retrain /jobs)")
        print(f"  redis + worker {redis_url}, queue defect-assist-retrain")
        print(f"  retrain jobs   {backend_url}/jobs  (JSON: stage, %, ETA; also `defect-assist jobs`)")
        if stack.label_studio is not None:
            from defect_assist_tools.local_label_studio import PASSWORD, USER

            print(f"  Label Studio   {stack.label_studio.url}  (login {USER} / {PASSWORD})")
            demo = f"{stack.label_studio.url}/projects/{stack.project}/data"
            print(f"  demo project   {demo}  (tab: By anomaly score)")
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

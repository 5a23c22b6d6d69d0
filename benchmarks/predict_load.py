"""/predict throughput and p50/p95/p99 at concurrency 1/4/8, backend and worker RSS (issue 18).

Fits a default PatchCore on magnetic-tile normals (``--train-n``, ``--image-size``) and publishes it as
project ``--project`` in a model store (a temporary one, or ``--model-dir``: a current version there is
reused, none is fitted and published there). Starts ``defect-assist serve`` on that store as a
separate process on a free 127.0.0.1 port, warms it up, times the bare ``model.predict([image])`` in
this process (batch 1, backend idle) as the reference, then for each concurrency level sends
``--requests`` POST /predict (one task each, a local test image, cycling through ``test/``) from that
many client threads. An answer counts as an error unless it is HTTP 200 with one result carrying a
verdict. The backend's RSS (its process and children, psutil) is sampled every 0.1 s; the peak is
kept per phase.

Then the retrain worker: a fresh redis-server and ``python -m defect_assist_worker`` (spawned work
horse); its RSS (process tree) idle, then its peak while it runs one real retrain job from local
images (``--worker-train-n`` normals at ``--worker-image-size`` px), then idle again.

Usage: ``nice -n 10 .venv/bin/python benchmarks/predict_load.py [--train-n 650] [--requests 64]
[--concurrency 1,4,8] [--model-dir DIR] [--no-worker] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import torch
from _serving import CpuMeter, RssSampler, cpu_model, peak_rss_mb, start_backend, stop_process, wait_until

from defect_assist.core.models.patchcore.config import PatchcoreConfig
from defect_assist.core.models.registry import create_model
from defect_assist.core.settings import get_settings
from defect_assist.core.store import ModelStore
from defect_assist.label_studio import LABELING_CONFIG

ROOT = Path(__file__).resolve().parents[1]
CONFIG = LABELING_CONFIG.read_text()
PACKAGES = ("defect-assist", "torch", "faiss-cpu", "numpy", "fastapi", "uvicorn", "httpx", "rq", "redis")


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def spread(items: list[Path], n: int) -> list[Path]:
    """``n`` items evenly spread over ``items`` (all of them when there are fewer)."""
    return items[:: max(1, len(items) // max(n, 1))][:n] if n < len(items) else list(items)


def percentiles(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    ms = np.asarray(seconds) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)}


def body(i: int, image: Path, project: str) -> dict[str, Any]:
    task = {"id": i, "project": int(project) if project.isdigit() else project, "data": {"image": str(image)}}
    return {"tasks": [task], "project": project, "label_config": CONFIG}


def problem(answer: httpx.Response) -> str | None:
    """None for HTTP 200 with one result that has a verdict (choices); else what is wrong."""
    if answer.status_code != 200:
        return f"{answer.status_code} {answer.text[:200]}"
    results = answer.json().get("results", [])
    if len(results) != 1 or not isinstance(results[0], dict):  # [] or [None]: the task failed
        return f"200 without a result: {answer.text[:200]}"
    if not any(r.get("type") == "choices" for r in results[0].get("result", [])):
        return f"200 without a verdict: {answer.text[:200]}"
    return None


def load_level(
    url: str,
    images: list[Path],
    project: str,
    requests: int,
    concurrency: int,
    budget_s: float,
    timeout: float,
) -> dict[str, Any]:
    """``requests`` POST /predict from ``concurrency`` threads; no new request after ``budget_s``."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + budget_s

    def client() -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            for i in counter:
                if time.monotonic() > deadline:
                    break
                started = time.perf_counter()
                try:
                    wrong = problem(http.post("/predict", json=body(i, images[i % len(images)], project)))
                except httpx.HTTPError as error:
                    wrong = repr(error)
                elapsed = time.perf_counter() - started
                with lock:
                    (errors.append(wrong) if wrong else latencies.append(elapsed))

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    sent = len(latencies) + len(errors)
    return {
        "concurrency": concurrency,
        "requests": sent,
        "wall_s": round(wall, 2),
        "throughput_tasks_s": round(len(latencies) / wall, 2) if wall else 0.0,
        **percentiles(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
    }


def fit_or_reuse(store: ModelStore, project: str, args: argparse.Namespace) -> dict[str, Any]:
    current = store.current(project)
    if current is not None:
        print(f"reusing {store.root} project {project} version {current.version}", flush=True)
        return {"reused": True, "version": current.version, **_model_facts(current.metadata)}
    normals = spread(sorted((args.data / "train/good").glob("*.jpg")), args.train_n)
    model = create_model("patchcore", device="cpu", image_size=args.image_size)
    started = time.perf_counter()
    model.fit(normals)
    fit_s = time.perf_counter() - started
    version = store.publish(project, model).version
    del model
    facts = _model_facts(store.current(project).metadata)
    print(
        f"fit default PatchCore {args.image_size} px on {len(normals)} normals in {fit_s:.1f} s", flush=True
    )
    return {"reused": False, "version": version, "fit_s": round(fit_s, 1), **facts}


def _model_facts(meta: dict[str, Any]) -> dict[str, Any]:
    keys = ("kind", "backbone", "image_size", "n_train_images", "fit_seconds")
    return {key: meta.get(key) for key in keys} | {"layers": (meta.get("config") or {}).get("layers")}


def bare_predict(store: ModelStore, project: str, version: str, images: list[Path]) -> dict[str, Any]:
    model = store.load(project, version, device="cpu")
    for image in images[:3]:  # warm-up
        model.predict([image])
    seconds = []
    for image in images:
        started = time.perf_counter()
        model.predict([image])
        seconds.append(time.perf_counter() - started)
    del model
    return {"n": len(seconds), **percentiles(seconds)}


def serve_under_load(args: argparse.Namespace, tmp: Path, figures: dict[str, Any]) -> None:
    model_dir = args.model_dir or tmp / "models"
    store = ModelStore(model_dir)
    figures["model"] = fit_or_reuse(store, args.project, args)
    version = figures["model"]["version"]
    tests = sorted((args.data / "test").rglob("*.jpg"))
    images = spread(tests, args.requests)  # each level cycles through the same images
    figures["images"] = {"n": len(images), "of": len(tests), "kinds": sorted({p.parent.name for p in images})}

    server, url = start_backend(model_dir, args.data.parent, tmp / "backend.log")
    levels: list[dict[str, Any]] = []
    try:
        with RssSampler(server.pid, interval=0.1) as rss:
            rss.set_phase("started (no model loaded)")
            time.sleep(2)
            rss.set_phase("warm-up")
            with httpx.Client(base_url=url, timeout=args.request_timeout) as http:
                http.post("/setup", json={"project": args.project, "schema": CONFIG}).raise_for_status()
                for i in range(args.warmup):
                    wrong = problem(
                        http.post("/predict", json=body(i, images[i % len(images)], args.project))
                    )
                    if wrong:
                        raise RuntimeError(f"warm-up /predict failed: {wrong}")
            rss.set_phase("idle, model loaded (bare predict runs in the benchmark process)")
            figures["bare_predict"] = bare_predict(store, args.project, version, spread(images, args.bare_n))
            for concurrency in args.concurrency:
                phase = f"concurrency {concurrency}"
                rss.set_phase(phase)
                cpu = CpuMeter([server.pid])  # and this process: the client
                level = load_level(
                    url,
                    images,
                    args.project,
                    args.requests,
                    concurrency,
                    args.level_budget,
                    args.request_timeout,
                )
                used = cpu.stop()
                rss.set_phase(None)
                level["backend_cpu_cores"], level["client_cpu_cores"] = (
                    used["tree_cores"][0],
                    used["self_cores"],
                )
                level["other_cpu_cores"], level["steal_cores"] = used["other_cores"], used["steal_cores"]
                level["backend_peak_rss_mb"] = round(rss.peaks.get(phase, float("nan")))
                levels.append(level)
                print(
                    f"  concurrency {concurrency}: {level['requests']} requests in {level['wall_s']} s, "
                    f"{level['errors']} errors",
                    flush=True,
                )
            figures["backend_rss_mb"] = {k: round(v) for k, v in rss.peaks.items()}
            figures["backend_vmhwm_mb"] = round(peak_rss_mb(server.pid))
            figures["backend_processes"] = 1 + len(psutil.Process(server.pid).children(recursive=True))
    except BaseException:
        print((tmp / "backend.log").read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        stop_process(server)
    figures["levels"] = levels


def worker_rss(args: argparse.Namespace, tmp: Path, figures: dict[str, Any]) -> None:
    import redis
    from rq import Worker
    from rq.job import Job

    from defect_assist_worker.redis_server import RedisServer
    from defect_assist_worker.triggers import request_retrain

    redis_server = RedisServer(tmp / "redis")
    redis_url = redis_server.start(detach=False)
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "MODEL_DIR": str(tmp / "worker-models"),
        "CACHE_DIR": str(tmp / "cache"),
        "DEVICE": "cpu",
        "MODEL_OPTIONS": json.dumps({"image_size": args.worker_image_size}),
        "LABEL_STUDIO_URL": "http://127.0.0.1:9",
        "PYTHONWARNINGS": "ignore",
    }
    log = open(tmp / "worker.log", "wb")  # noqa: SIM115 - lives as long as the worker
    worker = subprocess.Popen(
        [sys.executable, "-m", "defect_assist_worker", "--name", "predict-load"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    facts: dict[str, Any] = {"image_size": args.worker_image_size}
    try:
        connection = redis.Redis.from_url(redis_url)
        wait_until(lambda: Worker.count(connection=connection) > 0, 300, "the worker", worker)
        with RssSampler(worker.pid, interval=0.1) as rss:
            rss.set_phase("idle")
            time.sleep(args.idle_s)
            normals = spread(sorted((args.data / "train/good").glob("*.jpg")), args.worker_train_n)
            store = ModelStore(tmp / "worker-models")
            rss.set_phase("retrain")
            started = time.perf_counter()
            answer = request_retrain(
                "bench", "predict_load benchmark", mode="full", images=[str(p) for p in normals],
                connection=connection,
            )  # fmt: skip
            deadline = time.monotonic() + args.retrain_timeout
            while store.current_version("bench") is None:
                job = Job.fetch(answer["job_id"], connection=connection)
                if job.is_failed:
                    raise RuntimeError(f"retrain job failed: {job.meta.get('error')}")
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise TimeoutError(f"no retrained version within {args.retrain_timeout:.0f}s")
                time.sleep(0.1)
            facts["retrain_s"] = round(time.perf_counter() - started, 1)
            facts["retrain_normals"] = len(normals)
            rss.set_phase("idle after the job")
            time.sleep(args.idle_s)
            rss.set_phase(None)
            facts["rss_mb"] = {k: round(v) for k, v in rss.peaks.items()}
            facts["idle_rss_mb"] = round(rss.last.get("idle", float("nan")))
    except (RuntimeError, TimeoutError) as error:
        facts["error"] = str(error)
        tail = (tmp / "worker.log").read_text(errors="replace")[-2000:]
        print(f"worker: {error}\n{tail}", file=sys.stderr)
    finally:
        stop_process(worker)
        log.close()
        redis_server.stop()
    figures["worker"] = facts


HEADER = (
    *("concurrency", "requests", "throughput (tasks/s)", "p50 ms", "p95 ms", "p99 ms", "errors"),
    *("backend peak RSS MB", "backend CPU (cores)", "client CPU (cores)", "others / steal (cores)"),
)


def markdown_row(cells: tuple[object, ...]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def report(figures: dict[str, Any]) -> None:
    m, v, imgs = figures["model"], figures["versions"], figures["images"]
    print()
    print(
        f"CPU: {figures['cpu']} ({figures['cpus']} logical CPUs, {figures['affinity']} usable); "
        f"torch {v['torch']}, {figures['torch_threads']} threads (OMP_NUM_THREADS "
        f"{figures['omp_num_threads']}); load average {figures['loadavg_start']} at start, "
        f"{figures['loadavg_end']} at end"
    )
    print("versions: " + ", ".join(f"{k} {n}" for k, n in v.items()))
    how = "reused" if m["reused"] else f"fitted in {m['fit_s']} s"
    print(
        f"model: {m['kind']} {m['backbone']} {m['layers']} {m['image_size']} px, "
        f"{m['n_train_images']} normals ({how})"
    )
    print(f"images: {imgs['n']} of the {imgs['of']} test images ({', '.join(imgs['kinds'])}), cycled")
    print(
        "CPU columns: cores used during the level by the backend's process tree, by this process (the "
        "load client), by every other process on the machine / stolen by the hypervisor (steal)"
    )
    print()
    print(markdown_row(HEADER))
    print(markdown_row(("---",) * len(HEADER)))
    for lv in figures["levels"]:
        latency = (f"{lv[f'p{q}_ms']:.0f}" for q in (50, 95, 99))
        others = f"{lv['other_cpu_cores']:.2f} / {lv['steal_cores']:.2f}"
        row = (lv["concurrency"], lv["requests"], f"{lv['throughput_tasks_s']:.2f}", *latency, lv["errors"])
        cores = (f"{lv['backend_cpu_cores']:.2f}", f"{lv['client_cpu_cores']:.2f}", others)
        print(markdown_row((*row, lv["backend_peak_rss_mb"], *cores)))
    bare = figures["bare_predict"]
    print()
    print(
        f"bare model.predict, batch 1 (this process, backend idle): p50 {bare['p50_ms']:.0f} ms, "
        f"p95 {bare['p95_ms']:.0f} ms, p99 {bare['p99_ms']:.0f} ms (n={bare['n']})"
    )
    one = next((lv for lv in figures["levels"] if lv["concurrency"] == 1), None)
    if one and bare["p50_ms"]:
        figures["ratio_p50_c1_over_bare"] = round(one["p50_ms"] / bare["p50_ms"], 2)
        print(f"/predict p50 at concurrency 1 / bare predict p50: {figures['ratio_p50_c1_over_bare']:.2f}x")
    phases = "; ".join(f"{k} {n:.0f}" for k, n in figures["backend_rss_mb"].items())
    print(f"backend RSS peak by phase (MB, process tree, 0.1 s samples): {phases}")
    print(f"backend VmHWM over the run: {figures['backend_vmhwm_mb']:.0f} MB")
    worker = figures.get("worker")
    if worker is None:
        print("worker: not measured (--no-worker)")
    elif "error" in worker:
        print(f"worker: {worker['error']}; RSS so far {worker.get('rss_mb')}")
    else:
        r = worker["rss_mb"]
        print(
            f"worker RSS (process + work horse, MB): idle {worker['idle_rss_mb']:.0f}; peak during one "
            f"retrain job {r['retrain']:.0f} ({worker['retrain_normals']} normals, "
            f"{worker['image_size']} px, {worker['retrain_s']} s from request to published); idle after "
            f"the job {r['idle after the job']:.0f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=get_settings().datasets_dir / "magnetic_tile")
    parser.add_argument("--train-n", type=int, default=650, help="normals to fit on")
    parser.add_argument("--image-size", type=int, default=PatchcoreConfig.image_size)
    parser.add_argument("--model-dir", type=Path, default=None, help="model store to reuse (or fill)")
    parser.add_argument("--project", default="1")
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated levels")
    parser.add_argument("--requests", type=int, default=64, help="/predict requests per level")
    parser.add_argument("--warmup", type=int, default=4, help="/predict requests before timing")
    parser.add_argument("--bare-n", type=int, default=32, help="images for the bare model.predict reference")
    parser.add_argument("--level-budget", type=float, default=240, help="no new request after this (s)")
    parser.add_argument("--request-timeout", type=float, default=120)
    parser.add_argument("--no-worker", action="store_true", help="skip the worker RSS")
    parser.add_argument("--worker-train-n", type=int, default=60)
    parser.add_argument("--worker-image-size", type=int, default=128)
    parser.add_argument("--idle-s", type=float, default=5, help="worker idle sampling before/after the job")
    parser.add_argument("--retrain-timeout", type=float, default=300)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]

    figures: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "versions": versions(),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="predict-load-") as name:
        tmp = Path(name)
        serve_under_load(args, tmp, figures)
        if not args.no_worker:
            worker_rss(args, tmp, figures)
    figures["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    figures["total_s"] = round(time.perf_counter() - started, 1)
    report(figures)
    print(f"total {figures['total_s']} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    errors = sum(lv["errors"] for lv in figures["levels"])
    return 1 if errors or "error" in figures.get("worker", {}) else 0


if __name__ == "__main__":
    sys.exit(main())

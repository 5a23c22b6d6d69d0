"""Benchmark: "Start training → new version served" through the real queue.

A fresh embedded redis-server and one real worker process (``python -m defect_assist_worker``,
spawned work horse) are started; the clock runs from the retrain request to the moment the model
store's ``current`` pointer names the new version (what the backend hot-swaps to). Then the same
for an incremental PatchCore update with 50 new normals.

    .venv/bin/python benchmarks/retrain_latency.py [--normals 650] [--new 50] [--image-size 256]
    .venv/bin/python benchmarks/retrain_latency.py --label-studio      # the whole loop through LS

Images come from ``DATASETS_DIR/magnetic_tile`` (train/good, then test/good for the new ones) and
are handed to the job as local files. With ``--label-studio`` a real Label Studio holds them instead
(a project of local-files tasks, each annotated "normal" through the API before the clock starts)
and the job does what *Start training* makes it do: export the annotations, download every image
over HTTP into the content-addressed cache, train, calibrate, publish (no incremental figure then).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wait_version(store, project: str, previous: str | None, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = store.current_version(project)
        if current and current != previous:
            return current
        time.sleep(0.05)
    raise TimeoutError(f"no new version of {project} within {timeout:.0f}s")


def label_studio_project(normals: list[Path], tmp: Path) -> tuple[object, str]:
    """A running Label Studio with a project of ``normals`` (local files), each annotated "normal"."""
    import shutil

    from defect_assist_tools.local_label_studio import (
        CONFIG,
        ensure_label_studio,
        free_port,
        start_label_studio,
        template_data_dir,
    )

    executable = ensure_label_studio()
    shutil.copytree(template_data_dir(executable), tmp / "ls-data")
    root = normals[0].parent
    server = start_label_studio(
        executable, tmp, tmp / "ls-data", free_port(), tmp / "label-studio.log", document_root=root.parent
    )
    project = server.create_project("retrain benchmark", CONFIG.read_text())
    names = {p.name for p in normals}
    server.import_local_files(project, root)
    annotated = 0
    for task in server.tasks(project):
        if str(next(iter(task["data"].values()))).rsplit("/", 1)[-1] not in names:
            continue
        server.client.post(
            f"/api/tasks/{task['id']}/annotations",
            {"result": [{"from_name": "verdict", "to_name": "image", "type": "choices",
                         "value": {"choices": ["normal"]}}]},
        )  # fmt: skip
        annotated += 1
    print(f"Label Studio project {project}: {annotated} tasks annotated normal", flush=True)
    return server, str(project)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--normals", type=int, default=650)
    parser.add_argument("--new", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--label-studio", action="store_true", help="train from a real Label Studio project")
    args = parser.parse_args()

    datasets = Path(os.environ.get("DATASETS_DIR", ROOT.parent / "shared" / "datasets")) / "magnetic_tile"
    normals = sorted((datasets / "train" / "good").glob("*.jpg"))[: args.normals]
    new = sorted((datasets / "test" / "good").glob("*.jpg"))[: args.new]
    tmp = Path(tempfile.mkdtemp(prefix="retrain-bench-"))
    from defect_assist_worker.redis_server import RedisServer

    server = RedisServer(tmp / "redis")
    url = server.start(detach=False)
    env = dict(
        os.environ,
        REDIS_URL=url,
        MODEL_DIR=str(tmp / "models"),
        CACHE_DIR=str(tmp / "cache"),
        DEVICE=args.device,
        MODEL_OPTIONS=json.dumps({"image_size": args.image_size}),
        PYTHONWARNINGS="ignore",
    )
    os.environ.update(env)
    from defect_assist.core.settings import get_settings
    from defect_assist.core.store import ModelStore
    from defect_assist_worker.triggers import request_retrain

    project, label_studio = "bench", None
    if args.label_studio:
        label_studio, project = label_studio_project(normals, tmp)
        env |= {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token}
        os.environ.update(env)
    get_settings.cache_clear()
    store = ModelStore(tmp / "models")
    log = open(tmp / "worker.log", "wb")  # noqa: SIM115 - lives as long as the worker
    worker = subprocess.Popen(
        [sys.executable, "-m", "defect_assist_worker"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    figures: dict[str, object] = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "image_size": args.image_size,
    }
    try:
        import redis
        from rq import Worker

        connection = redis.Redis.from_url(url)
        deadline = time.monotonic() + 300
        while not Worker.count(connection=connection):  # its own start is not part of the figure
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"the worker did not start; see {tmp / 'worker.log'}")
            time.sleep(0.2)
        started = time.perf_counter()
        if label_studio is not None:
            request_retrain(project, "START_TRAINING", mode="full")  # what the LS webhook hands off
        else:
            request_retrain(project, "benchmark full", mode="full", images=[str(p) for p in normals])
        first = wait_version(store, project, None, args.timeout)
        full_s = time.perf_counter() - started
        meta = store.current(project).metadata
        figures |= {
            "full_images": len(normals),
            "full_s": round(full_s, 1),
            "full_fit_s": meta.get("fit_seconds"),
            "full_version": first,
            "device": meta["extra"].get("device"),
            "source": meta["extra"].get("source"),
        }
        print(
            f"Start training → new version served: {full_s:.1f} s  ({len(normals)} normals, full PatchCore, "
            f"fit {meta.get('fit_seconds')} s, device {meta['extra'].get('device')}, "
            f"images from {meta['extra'].get('source')})",
            flush=True,
        )
        if label_studio is not None:
            print(json.dumps(figures))
            if args.json:
                args.json.write_text(json.dumps(figures, indent=2))
            return

        started = time.perf_counter()
        request_retrain(
            "bench", "benchmark incremental", mode="auto", images=[str(p) for p in [*normals, *new]]
        )
        figures["incremental_version"] = wait_version(store, "bench", first, args.timeout)
        incremental_s = time.perf_counter() - started
        meta = store.current("bench").metadata
        figures |= {
            "incremental_new": len(new),
            "incremental_s": round(incremental_s, 1),
            "incremental_mode": meta.get("update"),
            "incremental_train_s": meta["extra"].get("train_seconds"),
        }
        print(
            f"Start training → new version served: {incremental_s:.1f} s  ({len(new)} new normals, "
            f"{meta.get('update')} update, train {meta['extra'].get('train_seconds')} s)",
            flush=True,
        )
        print(json.dumps(figures))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        server.stop()
        if label_studio is not None:
            from defect_assist_tools.local_label_studio import stop_label_studio

            stop_label_studio(label_studio)


if __name__ == "__main__":
    main()

"""Benchmark: "Start training → new version served" through the real queue.

A fresh embedded redis-server and one real worker process (``python -m defect_assist_worker``,
spawned work horse) are started; the clock runs from the retrain request to the moment the model
store's ``current`` pointer names the new version (what the backend hot-swaps to). Then the same
for an incremental PatchCore update with 50 new normals.

    .venv/bin/python benchmarks/retrain_latency.py [--normals 650] [--new 50] [--image-size 256]

Images come from ``DATASETS_DIR/magnetic_tile`` (train/good, then test/good for the new ones) and
are handed to the job as local files (the Label Studio export/download stage is not included).
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
    from defect_assist.settings import get_settings
    from defect_assist.store import ModelStore
    from defect_assist_worker.triggers import request_retrain

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
        request_retrain("bench", "benchmark full", mode="full", images=[str(p) for p in normals])
        first = wait_version(store, "bench", None, args.timeout)
        full_s = time.perf_counter() - started
        meta = store.current("bench").metadata
        figures |= {
            "full_images": len(normals),
            "full_s": round(full_s, 1),
            "full_fit_s": meta.get("fit_seconds"),
            "full_version": first,
            "device": meta["extra"].get("device"),
        }
        print(
            f"Start training → new version served: {full_s:.1f} s  ({len(normals)} normals, full PatchCore, "
            f"fit {meta.get('fit_seconds')} s, device {meta['extra'].get('device')})",
            flush=True,
        )

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


if __name__ == "__main__":
    main()

"""/predict latency per task (p50/p95) next to the bare model forward time on the same images.

Trains a PatchCore on a few magnetic-tile normals (or loads ``--project`` from ``--model-dir``),
serves it with the real backend app under uvicorn on a free port, and times:

- ``model.predict([image])`` — decode + forward + post-processing, no HTTP;
- ``POST /predict`` with one task per request (local file path in the task) — what LS pays per task;
- ``POST /predict`` with all tasks in one request, divided by the number of tasks.

Usage: ``python benchmarks/predict_latency.py [--image-size 256] [--n 40] [--device cpu]``
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn

from defect_assist.core.models.registry import create_model
from defect_assist.core.settings import Settings, resolve_device
from defect_assist.core.store import ModelStore
from defect_assist.label_studio import LABELING_CONFIG
from defect_assist.serving import create_app

ROOT = Path(__file__).resolve().parents[1]
CONFIG = LABELING_CONFIG.read_text()


def _percentiles(values: list[float]) -> str:
    ms = np.asarray(values) * 1000
    return f"p50 {np.percentile(ms, 50):7.1f} ms   p95 {np.percentile(ms, 95):7.1f} ms   (n={len(ms)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/datasets/magnetic_tile")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--n", type=int, default=40, help="test images to time")
    parser.add_argument("--train", type=int, default=40, help="normal images to fit on")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    train = sorted((args.data / "train/good").glob("*.jpg"))[:: max(1, 650 // args.train)][: args.train]
    tests = sorted(p for p in (args.data / "test").rglob("*.jpg"))
    tests = tests[:: max(1, len(tests) // args.n)][: args.n]
    device = resolve_device(args.device)
    model = create_model("patchcore", device=device, image_size=args.image_size)
    started = time.perf_counter()
    model.fit(train)
    print(
        f"fit PatchCore {args.image_size}px on {len(train)} normals "
        f"in {time.perf_counter() - started:.1f}s ({device})"
    )

    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(tmp)
        version = store.publish("1", model).version
        settings = Settings(model_dir=Path(tmp), device=device, label_studio_url="http://127.0.0.1:9")
        app = create_app(settings)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        served = ModelStore(tmp).load("1", version, device=device)

        def task(i: int, path: Path) -> dict:
            return {"id": i, "project": 1, "data": {"image": str(path)}}

        with httpx.Client(base_url=url, timeout=300) as client:
            client.post("/setup", json={"project": "1.0", "schema": CONFIG}).raise_for_status()
            for path in tests[: args.warmup]:
                served.predict([path])
                client.post("/predict", json={"tasks": [task(0, path)], "project": "1"}).raise_for_status()
            bare, http_one = [], []
            for i, path in enumerate(tests):
                t0 = time.perf_counter()
                served.predict([path])
                bare.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                answer = client.post("/predict", json={"tasks": [task(i, path)], "project": "1"})
                http_one.append(time.perf_counter() - t0)
                answer.raise_for_status()
                assert answer.json()["results"][0]["model_version"] == version
            t0 = time.perf_counter()
            batch = client.post(
                "/predict", json={"tasks": [task(i, p) for i, p in enumerate(tests)], "project": "1"}
            )
            batch_per_task = (time.perf_counter() - t0) / len(tests)
            batch.raise_for_status()
        server.should_exit = True

    print(
        f"images: {len(tests)} from {args.data / 'test'} (all defect kinds + good), {args.image_size}px model"
    )
    print(f"bare model.predict per image : {_percentiles(bare)}")
    print(f"/predict, 1 task per request : {_percentiles(http_one)}")
    print(f"/predict, {len(tests)} tasks in 1 request: {batch_per_task * 1000:7.1f} ms per task")
    print(
        f"HTTP + RLE/regions overhead (p50): {(np.median(http_one) - np.median(bare)) * 1000:.1f} ms per task"
    )


if __name__ == "__main__":
    main()

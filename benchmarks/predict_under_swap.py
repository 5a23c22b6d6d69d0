"""/predict under load while a version is published and rolled back: errors (must be 0), latency, RSS.

Fits a small PatchCore on magnetic-tile normals, publishes it as project 1, starts ``defect-assist
serve`` (a separate process, 127.0.0.1, a free port) on that model store and sends ``--n`` /predict
requests (one task each, a local image under DATASETS_DIR) from ``--concurrency`` threads. After a
quarter of the requests a second version is published, after 60 % the project is rolled back to the
first. An answer counts as an error unless it is HTTP 200 with one result carrying a verdict and a
model version that was complete when it answered (v1 or v2). Prints errors, p50/p95/p99 latency, the
versions answered and the server's peak RSS (VmHWM).

Usage: ``nice -n 10 python benchmarks/predict_under_swap.py [--n 1000] [--concurrency 8]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from _serving import cpu_model as _cpu
from _serving import free_port as _free_port
from _serving import peak_rss_mb as _peak_rss_mb

from defect_assist.core.models.registry import create_model
from defect_assist.core.settings import get_settings
from defect_assist.core.store import ModelStore
from defect_assist.label_studio import LABELING_CONFIG

CONFIG = LABELING_CONFIG.read_text()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=get_settings().datasets_dir / "magnetic_tile")
    parser.add_argument("--n", type=int, default=1000, help="/predict requests")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--train", type=int, default=16, help="normals to fit on")
    args = parser.parse_args()

    train = sorted((args.data / "train/good").glob("*.jpg"))[::20][: args.train]
    images = sorted((args.data / "test").rglob("*.jpg"))[::10][:64]
    model = create_model("patchcore", device="cpu", image_size=args.image_size)
    model.fit(train)
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(tmp)
        v1 = store.publish("1", model).version
        port = _free_port()
        env = {
            **os.environ,
            "MODEL_DIR": tmp,
            "DEVICE": "cpu",
            "LABEL_STUDIO_URL": "http://127.0.0.1:9",
            "LABEL_STUDIO_SYNC": "false",
            "DATASETS_DIR": str(args.data.parent),
        }
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "defect_assist_tools",
                "serve",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            latencies: list[float] = []
            errors: list[str] = []
            versions: Counter[str] = Counter()
            complete = {v1}
            lock = threading.Lock()
            counter = iter(range(args.n))
            done = [0]
            swaps: list[str] = []

            def client() -> None:
                with httpx.Client(timeout=120) as http:
                    for i in counter:
                        task = {"id": i, "project": 1, "data": {"image": str(images[i % len(images)])}}
                        body = {"tasks": [task], "project": "1", "label_config": CONFIG}
                        started = time.perf_counter()
                        try:
                            answer = http.post(f"{url}/predict", json=body)
                            elapsed = time.perf_counter() - started
                            results = answer.json().get("results", []) if answer.status_code == 200 else []
                            answered = bool(results) and isinstance(results[0], dict)  # [] = failed task
                            version = results[0].get("model_version") if answered else None
                            ok = (
                                answer.status_code == 200
                                and len(results) == 1
                                and answered
                                and any(r.get("type") == "choices" for r in results[0]["result"])
                            )
                            problem = None if ok else f"{answer.status_code} {answer.text[:200]}"
                        except httpx.HTTPError as error:
                            elapsed, version, problem = time.perf_counter() - started, None, repr(error)
                        with lock:
                            latencies.append(elapsed)
                            done[0] += 1
                            if problem:
                                errors.append(problem)
                            else:
                                versions[str(version)] += 1

            def swapper() -> None:
                while done[0] < args.n // 4:
                    time.sleep(0.01)
                published = store.publish("1", model)
                complete.add(published.version)  # versions are checked after the run (no race here)
                swaps.append(f"published {published.version} at request {done[0]}")
                while done[0] < args.n * 6 // 10:
                    time.sleep(0.01)
                store.rollback("1", v1)
                swaps.append(f"rolled back to {v1} at request {done[0]}")

            started = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
            threads.append(threading.Thread(target=swapper))
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - started
            unknown = {v: n for v, n in versions.items() if v not in complete}
            errors += [f"{n} answer(s) from {v}, not a published version" for v, n in unknown.items()]
            ms = np.asarray(latencies) * 1000
            print(f"CPU: {_cpu()} ({os.cpu_count()} logical CPUs visible)")
            print(
                f"{args.n} /predict at concurrency {args.concurrency} in {wall:.1f}s ({args.n / wall:.1f}/s)"
            )
            print("; ".join(swaps))
            print(f"errors: {len(errors)}" + (f"  first: {errors[:3]}" if errors else ""))
            print(
                f"latency p50 {np.percentile(ms, 50):.1f} ms  p95 {np.percentile(ms, 95):.1f} ms  "
                f"p99 {np.percentile(ms, 99):.1f} ms  max {ms.max():.1f} ms"
            )
            print(f"answered by version: {dict(versions)}")
            print(f"server peak RSS: {_peak_rss_mb(server.pid):.0f} MB")
            return 1 if errors else 0
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())

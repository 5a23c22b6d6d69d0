"""The README's main command: the embedded stack (real redis-server, worker, backend, Label Studio),
killed with ``kill -9`` mid-training and started again."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from defect_assist.core.store import ModelStore
from defect_assist_tools.local_label_studio import ensure_label_studio, free_port, template_data_dir

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (its children start their own sessions, so no process group does)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def _kill9_stack(process: subprocess.Popen) -> None:
    for pid in [process.pid, *_descendants(process.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)


def _wait_for_line(log: Path, pattern: str, process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if re.search(pattern, text):
            return text
        if process.poll() is not None:
            pytest.fail(f"the stack exited with {process.returncode}:\n{text[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"no line matching {pattern!r} within {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def test_stack_killed_mid_training_comes_back_with_one_model_and_label_studio(
    tmp_path: Path, magnetic_tile: Path
) -> None:
    """Command 1 killed with ``kill -9`` (every process) while the first model trains, then run again:
    it comes up with no traceback, the interrupted job is re-queued (no second training request), one
    version is published, ``/predict`` answers, and every Label Studio task carries its prediction."""
    template_data_dir(ensure_label_studio())  # install Label Studio once (cached in .ls-venv)
    env = {
        **os.environ,
        "MODEL_DIR": str(tmp_path / "models"),
        "REDIS_DATA_DIR": str(tmp_path / "redis"),
        "CACHE_DIR": str(tmp_path / "cache"),
        "QDRANT_PATH": str(tmp_path / "qdrant"),
        "MODEL_OPTIONS": json.dumps({"image_size": 96}),
        "DEVICE": "cpu",
        "REDIS_URL": "",
    }
    ports = ["--port", str(free_port()), "--label-studio-port", str(free_port())]
    command = [
        sys.executable, "-m", "defect_assist_tools", "stack", "--data", str(magnetic_tile),
        "--max-train", "120", "--tasks", "4", "--state-dir", str(tmp_path / "stack"), *ports,
    ]  # fmt: skip
    first_log = tmp_path / "first-run.log"
    with open(first_log, "w") as out:
        first = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        _wait_for_line(first_log, r"first model: (features|train|coreset)", first, 600)
    finally:
        _kill9_stack(first)
    assert ModelStore(tmp_path / "models").versions(_project(first_log.read_text())) == []
    worker_log = tmp_path / "stack" / "logs" / "worker.log"
    worker_before = worker_log.stat().st_size if worker_log.exists() else 0

    process = subprocess.Popen(
        [*command, "--smoke"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        output, _ = process.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the stack stops its children on SIGTERM
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"the stack did not finish its smoke check:\n{output[-5000:]}")
    assert process.returncode == 0, output[-5000:]
    assert "defect-assist stack is up" in output, output[-3000:]
    assert "Traceback" not in output, output[-5000:]
    assert "Traceback" not in worker_log.read_text(errors="replace")[worker_before:]
    assert re.search(r"re-queued 1 retrain job", output), output[-3000:]

    project = re.search(r"model\s+project (\S+), version (\S+)", output)
    assert project, output[-3000:]
    versions = ModelStore(tmp_path / "models").versions(project.group(1))
    assert [v.version for v in versions] == [project.group(2)]  # the interrupted job ran once, no duplicate

    answers = re.findall(r"/predict (\w+)/\S+: score ([0-9.]+), (normal|anomalous) \(([^;]+);", output)
    assert len(answers) == 2 and answers[0][0] == "good", output[-3000:]  # a normal and a defect image
    for _, score, verdict, version in answers:
        assert 0.0 <= float(score) <= 1.0 and version == project.group(2)
        assert verdict == ("anomalous" if float(score) >= 0.5 else "normal")

    predicted = re.search(r"project \d+: (\d+)/(\d+) task\(s\) carry predictions of (\S+)", output)
    assert predicted, output[-3000:]
    assert predicted.groups() == ("4", "4", project.group(2)), output[-3000:]  # by the backend, unasked
    # everything it started is gone: the embedded redis-server's pid file names a dead process
    pid_file = tmp_path / "redis" / "redis.pid"
    if pid_file.exists():
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text().strip()), 0)


def _project(output: str) -> str:
    found = re.search(r"project (\S+) has no model", output)
    assert found, output[-3000:]
    return found.group(1)

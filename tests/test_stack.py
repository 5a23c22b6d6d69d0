"""The README's main command: the embedded stack (real redis-server, worker, backend, Label Studio)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from defect_assist.core.store import ModelStore
from defect_assist_tools.local_label_studio import ensure_label_studio, free_port, template_data_dir

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def test_stack_trains_first_model_and_connects_label_studio(tmp_path: Path, magnetic_tile: Path) -> None:
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
    command = [
        sys.executable, "-m", "defect_assist_tools", "stack", "--smoke", "--label-studio",
        "--data", str(magnetic_tile), "--max-train", "16", "--tasks", "4",
        "--port", str(free_port()), "--label-studio-port", str(free_port()),
        "--state-dir", str(tmp_path / "stack"),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
    )
    try:
        output, _ = process.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the stack stops its children on SIGTERM
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"the stack did not finish its smoke check:\n{output[-5000:]}")
    assert process.returncode == 0, output[-5000:]
    assert "defect-assist stack is up" in output, output[-3000:]

    project = re.search(r"model\s+project (\S+), version (\S+)", output)
    assert project, output[-3000:]
    versions = ModelStore(tmp_path / "models").versions(project.group(1))
    assert [v.version for v in versions] == [project.group(2)]  # trained by the worker, published once

    answers = re.findall(r"/predict (\w+)/\S+: score ([0-9.]+) \((\S+)\)", output)
    assert len(answers) == 2 and answers[0][0] == "good", output[-3000:]  # a normal and a defect image
    assert all(0.0 <= float(score) <= 1.0 and version == project.group(2) for _, score, version in answers)

    predicted = re.search(r"Label Studio project \d+: (\d+) task\(s\) carry predictions", output)
    assert predicted and int(predicted.group(1)) == 4, output[-3000:]
    # everything it started is gone: the embedded redis-server's pid file names a dead process
    pid_file = tmp_path / "redis" / "redis.pid"
    if pid_file.exists():
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text().strip()), 0)

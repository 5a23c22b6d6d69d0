"""Retrains never forget, through a real redis-server, a real worker process and the backend app.

A project's first model comes from 60 magnetic-tile folder normals (every 10th of train/good; PatchCore
at 96 px to stay under a minute of fitting on two busy cores; 6 of the 60 are held out by digest as
check normals). Then, as in issue 14:

- a retrain with 3 new normals keeps all of them: the served model has every earlier normal (its
  n_train_images and memory bank grow), and the good test tiles stay normal;
- a poisoned retrain (8 defect images presented as normals) is published as a candidate with its
  reason, listed by ``versions`` and ``jobs``, while the backend keeps serving the earlier version;
  ``POST /versions/{v}/promote`` and ``POST /versions/rollback`` on the backend app move ``CURRENT``;
- a project with only 3 normals fails its job with the reason, not a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rq.job import Job
from typer.testing import CliRunner
from worker_support import WorkerProcess, wait_for

pytestmark = pytest.mark.integration

PROJECT = "40"


@pytest.fixture
def worker_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh embedded redis-server, one worker process, and settings shared with this process."""
    from defect_assist.core.settings import get_settings
    from defect_assist_worker.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis")
    url = server.start(detach=False)
    env = {
        "REDIS_URL": url,
        "MODEL_DIR": str(tmp_path / "models"),
        "CACHE_DIR": str(tmp_path / "cache"),
        "QDRANT_PATH": str(tmp_path / "qdrant"),
        "DEVICE": "cpu",
        "MODEL_OPTIONS": json.dumps({"image_size": 96}),
        "OMP_NUM_THREADS": "2",
        "LABEL_STUDIO_URL": "http://127.0.0.1:9",
        "PYTHONWARNINGS": "ignore",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    worker = WorkerProcess(dict(os.environ), tmp_path / "worker.log", "never-forget").start()
    try:
        yield {"url": url, "models": tmp_path / "models", "worker": worker}
    finally:
        worker.stop()
        server.stop()
        get_settings.cache_clear()


def _run_job(connection, answer: dict, worker: WorkerProcess, status: str = "finished") -> Job:
    def ended():
        job = Job.fetch(answer["job_id"], connection=connection)
        return job if job.get_status() in ("finished", "failed") else None

    try:
        job = wait_for(ended, 300, 0.2, f"job {answer['job_id']}")
    except TimeoutError:
        raise AssertionError(worker.log()) from None
    result = job.latest_result()
    assert job.get_status() == status, f"{job.meta} {result.exc_string if result else ''}"
    return job


def test_retrains_keep_earlier_normals_and_poison_stays_a_candidate(worker_env, magnetic_tile):
    import redis
    import torch
    from fastapi.testclient import TestClient

    from defect_assist.core.store import ModelStore
    from defect_assist_tools.cli import app as cli
    from defect_assist_tools.serve import backend_app
    from defect_assist_worker.status import describe_job, list_jobs
    from defect_assist_worker.triggers import request_retrain

    connection = redis.Redis.from_url(worker_env["url"])
    store = ModelStore(worker_env["models"])
    train = sorted((magnetic_tile / "train" / "good").glob("*.jpg"))
    folder, new = train[::10][:60], train[3::200][:3]
    good_tiles = sorted((magnetic_tile / "test" / "good").glob("*.jpg"))[::12][:12]
    poison = sorted((magnetic_tile / "test" / "uneven").glob("*.jpg"))[::9][:8]

    # a project with 3 normals, then the first model of ours: 60 folder normals, as the stack or
    # `defect-assist train` would give them (both queued at once: one worker runs them in turn)
    three = request_retrain("41", "three", images=[str(p) for p in new], connection=connection)
    stack = request_retrain(
        PROJECT, "stack: first model", images=[str(p) for p in folder], connection=connection
    )
    from defect_assist.core.models.registry import model_class

    model_class("patchcore")  # import torch & co. here while the worker trains

    refused = _run_job(connection, three, worker_env["worker"], status="failed")  # no training, no version
    info = describe_job(refused)
    assert info["stage"] == "refused" and info["failure"] == info["error"]
    assert "only 3 normal images to train on" in info["error"] and "at least 10" in info["error"]
    assert "Traceback" not in info["failure"] and store.versions("41") == []

    first = _run_job(connection, stack, worker_env["worker"]).return_value()
    v1 = store.current(PROJECT)
    assert first["current"] is True and first["version"] == v1.version == "v0001-patchcore"
    n_check = first["n_check_normals"]
    assert n_check == len(v1.metadata["extra"]["check_images"]) == 6
    assert v1.metadata["n_train_images"] == len(v1.metadata["extra"]["training_images"]) == 60 - n_check
    kept = {p.stem for p in store.images_dir(PROJECT).glob("*/*")}
    assert kept == {*v1.metadata["extra"]["training_images"], *v1.metadata["extra"]["check_images"]}

    # Start training after 3 new normals: the 60 stay, the check passes, the backend serves it
    second = _run_job(
        connection,
        request_retrain(PROJECT, "START_TRAINING", images=[str(p) for p in new], connection=connection),
        worker_env["worker"],
    ).return_value()
    assert (second["mode"], second["current"], second["n_previous"]) == ("incremental", True, 60 - n_check)
    assert second["check_reason"].startswith(f"not worse than v0001-patchcore on {n_check} check normals")
    v2 = store.current(PROJECT)
    assert v2.version == second["version"] == "v0002-patchcore"
    assert v2.metadata["n_train_images"] == 60 - n_check + 3
    assert set(v2.metadata["extra"]["training_images"]) >= set(v1.metadata["extra"]["training_images"])
    older, newer = (
        store.load(PROJECT, v1.version, device="cpu"),
        store.load(PROJECT, v2.version, device="cpu"),
    )
    bank, grown = older.model.memory_bank, newer.model.memory_bank
    assert grown.shape[0] >= bank.shape[0] and torch.equal(grown[: bank.shape[0]], bank)  # nothing dropped

    app = backend_app()
    with TestClient(app) as client:
        assert client.get("/versions", params={"project": PROJECT}).json()["current"] == v2.version
        served_version, served = app.state.model.model_for(PROJECT)
        assert served_version == v2.version
        now = {t.name for t, p in zip(good_tiles, served.predict(good_tiles), strict=True) if p.is_anomalous}
        before = {
            t.name for t, p in zip(good_tiles, older.predict(good_tiles), strict=True) if p.is_anomalous
        }
        assert now <= before and len(now) <= 2, f"good tiles called anomalous: {now} (v0001: {before})"

        # defects presented as normals: published as a candidate, v2 keeps serving
        job = _run_job(
            connection,
            request_retrain(PROJECT, "poisoned", images=[str(p) for p in poison], connection=connection),
            worker_env["worker"],
        )
        third = job.return_value()
        assert third["current"] is False and third["status"] == "candidate"
        assert "new normals look anomalous to v0002-patchcore" in third["check_reason"]
        assert store.current_version(PROJECT) == v2.version
        candidate = store.version(PROJECT, third["version"])
        assert candidate.status == "candidate" and candidate.candidate_reason == third["check_reason"]
        listed = {j["id"]: j for j in list_jobs(connection, PROJECT)}[job.id]
        assert listed["current"] is False and listed["check_reason"] == third["check_reason"]
        assert listed["made_current"] is False
        earlier = {j["version"]: j for j in list_jobs(connection, PROJECT) if j["version"]}
        assert earlier[v2.version]["current"] is True  # still serving
        assert earlier[v1.version]["current"] is False and earlier[v1.version]["made_current"] is True
        versions = CliRunner().invoke(cli, ["versions", "--project", PROJECT, "--json"])
        assert [(v["version"], v["status"]) for v in json.loads(versions.stdout)] == [
            ("v0001-patchcore", "previous"),
            ("v0002-patchcore", "current"),
            ("v0003-patchcore", "candidate"),
        ]
        assert app.state.model.model_for(PROJECT)[0] == v2.version

        promoted = client.post(f"/versions/{third['version']}/promote", params={"project": PROJECT})
        assert promoted.status_code == 200 and promoted.json()["status"] == "current"
        assert app.state.model.model_for(PROJECT)[0] == third["version"]
        back = client.post("/versions/rollback", params={"project": PROJECT}).json()
        assert back["version"] == v2.version and app.state.model.model_for(PROJECT)[0] == v2.version

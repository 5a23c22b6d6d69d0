"""Retraining on RQ with a real redis-server and real worker processes (tiny PatchCore, 64 px).

- two triggers in a row → one job plus at most one follow-up, never two at once;
- ``kill -9`` of the worker mid-training → the old version keeps serving, no partial version, the job
  re-runs to completion after a worker restart;
- a Redis crash/restart with a queued job → the job still runs (AOF persistence).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pytest
from rq.job import Job
from worker_support import WorkerProcess, wait_for

from defect_assist_worker.redis_server import pid_alive

pytestmark = pytest.mark.integration

TINY = {"image_size": 64}


@pytest.fixture
def worker_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh embedded redis-server (AOF) and the environment the worker processes get."""
    from defect_assist.core.settings import get_settings
    from defect_assist_worker.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis")
    url = server.start(detach=False)
    env = {
        "REDIS_URL": url,
        "MODEL_DIR": str(tmp_path / "models"),
        "CACHE_DIR": str(tmp_path / "cache"),
        "DEVICE": "cpu",
        "MODEL_OPTIONS": json.dumps(TINY),
        "OMP_NUM_THREADS": "2",
        "LABEL_STUDIO_URL": "http://127.0.0.1:9",
        "PYTHONWARNINGS": "ignore",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    workers: list[WorkerProcess] = []

    def start_worker(name: str, burst: bool = False) -> WorkerProcess:
        worker = WorkerProcess(dict(os.environ), tmp_path / f"{name}.log", name).start(burst=burst)
        workers.append(worker)
        return worker

    yield {"server": server, "url": url, "tmp": tmp_path, "start_worker": start_worker, "workers": workers}
    for worker in workers:
        worker.stop()
    server.stop()
    get_settings.cache_clear()


def _connection(url: str):
    import redis

    return redis.Redis.from_url(url)


def _wait_status(connection, job_id: str, status: str, timeout: float = 120) -> Job:
    """The job once it has ``status`` (``scheduled`` for a retry, ``failed`` …)."""
    return wait_for(
        lambda: (j := Job.fetch(job_id, connection=connection)).get_status() == status and j,
        timeout,
        0.2,
        f"job {job_id} {status}",
    )


def _wait_job(connection, job_id: str, timeout: float, workers: list[WorkerProcess]) -> Job:
    def done():
        job = Job.fetch(job_id, connection=connection)
        return job if job.get_status() in ("finished", "failed") else None

    try:
        job = wait_for(done, timeout, 0.2, f"job {job_id}")
    except TimeoutError:
        raise AssertionError("\n".join(w.log() for w in workers)) from None
    assert job.get_status() == "finished", (
        f"{job.meta} {job.latest_result().exc_string if job.latest_result() else ''}"
    )
    return job


def test_two_triggers_one_job_and_one_followup_never_concurrent(worker_env, train_normals):
    from defect_assist.core.store import ModelStore
    from defect_assist_worker.status import list_jobs
    from defect_assist_worker.triggers import request_retrain

    connection = _connection(worker_env["url"])
    images = [str(p) for p in train_normals[:12]]
    first = request_retrain("7", "first", images=images, connection=connection)
    second = request_retrain("7", "second", images=images, connection=connection)
    assert first["status"] == "queued"
    assert second == {"status": "coalesced", "job_id": first["job_id"], "project": "7"}  # not started yet

    # two workers: a follow-up must still wait for the running job
    worker_env["start_worker"]("w1")
    worker_env["start_worker"]("w2")
    wait_for(
        lambda: Job.fetch(first["job_id"], connection=connection).get_status() == "started", 120, 0.1, "start"
    )
    third = request_retrain("7", "third", images=images, connection=connection)
    fourth = request_retrain("7", "fourth", images=images, connection=connection)
    assert third["status"] == "follow-up scheduled" and third["job_id"] == first["job_id"]
    assert fourth["status"] == "follow-up already scheduled"

    _wait_job(connection, first["job_id"], 240, worker_env["workers"])
    jobs = wait_for(lambda: (j := list_jobs(connection, "7")) and len(j) == 2 and j, 30, 0.2, "follow-up job")
    followup = next(j for j in jobs if j["id"] != first["job_id"])
    assert "third" in followup["reason"]
    done = _wait_job(connection, followup["id"], 240, worker_env["workers"])

    results = [Job.fetch(first["job_id"], connection=connection).return_value(), done.return_value()]
    spans = sorted(
        (datetime.fromisoformat(r["started_at"]), datetime.fromisoformat(r["finished_at"])) for r in results
    )
    assert spans[0][1] <= spans[1][0], f"jobs overlapped: {spans}"
    assert len(list_jobs(connection, "7")) == 2  # exactly one job plus one follow-up
    versions = ModelStore(worker_env["tmp"] / "models").versions("7")
    assert [v.version for v in versions] == ["v0001-patchcore", "v0002-patchcore"]
    assert versions[-1].is_current and versions[-1].metadata["image_size"] == 64


def test_kill9_worker_mid_training_keeps_old_version_and_reruns(worker_env, train_normals, magnetic_tile):
    from defect_assist.core.settings import get_settings
    from defect_assist.core.store import ModelStore
    from defect_assist.training.pipeline import train_and_publish
    from defect_assist_worker.triggers import request_retrain

    connection = _connection(worker_env["url"])
    store = ModelStore(worker_env["tmp"] / "models")
    old = train_and_publish("9", list(train_normals[:10]), [], settings=get_settings(), options=TINY)
    assert store.current_version("9") == old["version"] == "v0001-patchcore"

    more = sorted((magnetic_tile / "train" / "good").glob("*.jpg"))[::9][:40]
    answer = request_retrain(
        "9",
        "big",
        mode="full",
        images=[str(p) for p in more],
        options={"image_size": 96},
        connection=connection,
    )
    worker = worker_env["start_worker"]("victim")
    training = {"features", "coreset", "calibrate"}
    job = wait_for(
        lambda: (j := Job.fetch(answer["job_id"], connection=connection)).meta.get("stage") in training and j,
        180,
        0.05,
        "training stage",
    )
    horse = int(job.meta["pid"])
    worker.kill9()
    wait_for(lambda: not pid_alive(horse), 10, 0.05, "work horse to die with its worker")

    # the old version keeps serving; nothing partial is visible
    assert store.current_version("9") == "v0001-patchcore"
    assert [v.version for v in store.versions("9")] == ["v0001-patchcore"]
    assert store.load("9", device="cpu").predict([train_normals[11]])[0].ok
    assert Job.fetch(answer["job_id"], connection=connection).get_status() == "started"  # abandoned

    worker_env["start_worker"]("restarted")
    done = _wait_job(connection, answer["job_id"], 300, worker_env["workers"])
    assert done.meta.get("recovered") == 1
    assert store.current_version("9") == "v0002-patchcore"
    assert store.current("9").metadata["n_train_images"] == len(more)


def test_redis_restart_with_queued_job_still_runs(worker_env, train_normals):
    from defect_assist.core.store import ModelStore
    from defect_assist_worker.triggers import request_retrain

    server = worker_env["server"]
    connection = _connection(worker_env["url"])
    answer = request_retrain(
        "11", "before crash", images=[str(p) for p in train_normals[:10]], connection=connection
    )
    assert answer["status"] == "queued"
    connection.close()
    server.kill()  # crash, not a clean shutdown: only the fsynced AOF keeps the job
    assert server.start(detach=False) == worker_env["url"]
    connection = _connection(worker_env["url"])
    assert Job.fetch(answer["job_id"], connection=connection).get_status() == "queued"

    worker_env["start_worker"]("after-restart", burst=True)
    done = _wait_job(connection, answer["job_id"], 240, worker_env["workers"])
    assert done.return_value()["version"] == "v0001-patchcore"
    assert ModelStore(worker_env["tmp"] / "models").current_version("11") == "v0001-patchcore"


def test_label_studio_unreachable_is_retried_with_backoff(worker_env):
    from defect_assist_worker.status import describe_job
    from defect_assist_worker.triggers import request_retrain

    connection = _connection(worker_env["url"])
    answer = request_retrain("13", "ls down", connection=connection)  # LABEL_STUDIO_URL: closed port
    worker_env["start_worker"]("retry")
    job = _wait_status(connection, answer["job_id"], "scheduled")
    # rq (Job.retry) sets the status at once and saves the retry count with its pipeline: wait for both
    info = wait_for(
        lambda: (i := describe_job(Job.fetch(job.id, connection=connection)))["retries_left"] == 2 and i,
        30,
        0.2,
        "retry count after the first failure",
    )
    assert info["stage"] == "waiting-retry" and "unreachable" in info["error"]


def test_label_studio_still_down_after_the_retries_fails_the_job_with_the_reason(
    worker_env, monkeypatch: pytest.MonkeyPatch
):
    """Backoff between attempts (RETRAIN_RETRY_INTERVALS), then a failed job that says why and how often
    it tried; the project can be retrained again at once (the job no longer blocks it)."""
    from defect_assist.core.settings import get_settings
    from defect_assist_worker.status import describe_job
    from defect_assist_worker.triggers import request_retrain

    monkeypatch.setenv("RETRAIN_RETRY_INTERVALS", "1,2")
    get_settings.cache_clear()
    connection = _connection(worker_env["url"])
    answer = request_retrain("14", "ls down for good", connection=connection)
    worker_env["start_worker"]("gives-up")
    job = _wait_status(connection, answer["job_id"], "failed")
    info = describe_job(job)
    assert info["stage"] == "failed" and info["retries_left"] == 0
    assert "unreachable" in info["error"] and "gave up after 3 attempts" in info["error"], info["error"]
    assert job.meta["attempt"] == 3
    again = request_retrain("14", "after the outage", connection=connection)
    assert again["status"] == "queued" and again["job_id"] != answer["job_id"]


def test_http_router_requests_retrain_and_lists_jobs(worker_env, train_normals):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from defect_assist_worker.routes import router

    app = FastAPI()
    app.include_router(router)
    with TestClient(app) as client:
        images = [str(p) for p in train_normals[:3]]
        first = client.post("/retrain", json={"project": "21", "reason": "fiftyone", "images": images}).json()
        again = client.post("/retrain", json={"project": "21", "reason": "again"}).json()
        assert first["status"] == "queued"
        assert (again["status"], again["job_id"]) == ("coalesced", first["job_id"])
        assert client.post("/retrain", json={"project": "21", "mode": "bogus"}).status_code == 422
        jobs = client.get("/jobs", params={"project": "21"}).json()
        assert [(j["id"], j["status"], j["stage"], j["reason"]) for j in jobs] == [
            (first["job_id"], "queued", "queued", "fiftyone")
        ]
        assert client.get(f"/jobs/{first['job_id']}").json()["project"] == "21"
        assert client.get("/jobs/nope").status_code == 404


def test_start_training_answer_names_the_job_and_its_progress_page(worker_env):
    """Label Studio records the ``job`` of the Start-training answer; the progress URL serves the job."""
    from fastapi.testclient import TestClient

    from defect_assist_tools.serve import backend_app

    with TestClient(backend_app()) as client:
        answer = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 31}}).json()
        assert (answer["status"], answer["action"], answer["job_status"]) == (
            "accepted",
            "START_TRAINING",
            "queued",
        )
        job = Job.fetch(answer["job"], connection=_connection(worker_env["url"]))
        assert job.kwargs["project"] == "31"
        assert answer["progress"].endswith(f"/jobs/{job.id}")
        progress = client.get(answer["progress"].replace("http://testserver", "")).json()
        assert (progress["id"], progress["project"], progress["stage"]) == (job.id, "31", "queued")
        legacy = client.post("/train", json={"project": "31.1712345678"}).json()  # the pre-webhook LS call
        assert (legacy["job"], legacy["job_status"]) == (job.id, "coalesced")
        other = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 31}}).json()
        assert "job" not in other  # other webhooks are accepted at once, handled off the request


def test_recovery_requeues_a_job_whose_execution_record_expired(worker_env):
    """A worker killed long ago leaves a started-registry entry whose execution hash has expired
    (issue 14: the next start crashed with ``Execution … not found in Redis``)."""
    import time

    from rq import Queue
    from rq.job import JobStatus
    from rq.registry import StartedJobRegistry

    from defect_assist_worker.queues import RETRAIN_QUEUE
    from defect_assist_worker.worker import recover_abandoned

    connection = _connection(worker_env["url"])
    queue = Queue(RETRAIN_QUEUE, connection=connection)
    job = queue.enqueue("defect_assist_worker.jobs.retrain", kwargs={"project": "p"})
    queue.remove(job)
    job.set_status(JobStatus.STARTED)
    job.worker_name = "killed-long-ago"
    job.save()
    registry = StartedJobRegistry(queue=queue)
    connection.zadd(registry.key, {f"{job.id}:expired-execution": time.time() + 3600})
    connection.zadd(job.execution_registry.key, {"expired-execution": time.time() + 3600})  # no hash
    with pytest.raises(ValueError, match="not found in Redis"):  # what rq's own removal trips over
        registry.remove_executions(job)

    assert recover_abandoned(connection, (RETRAIN_QUEUE,)) == [job.id]
    assert job.get_status(refresh=True) == JobStatus.QUEUED
    assert queue.get_job_ids() == [job.id]
    assert connection.zcard(registry.key) == 0


def test_redis_with_an_unreadable_append_only_file_starts_and_keeps_it_aside(tmp_path: Path):
    """A stale, damaged AOF (issue 14: restart safety) must not keep the queue's Redis down."""
    import redis

    from defect_assist_worker.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis")
    url = server.start(detach=False)
    redis.Redis.from_url(url).set("k", "v")
    server.kill()
    aof_dir = tmp_path / "redis" / "appendonlydir"
    for aof in aof_dir.glob("*.aof"):
        aof.write_bytes(b"*3\r\n$3\r\nSET\r\nthis is not the append-only format\r\n" * 3)
    try:
        url = server.start(detach=False)
        assert redis.Redis.from_url(url).ping()
        assert list((tmp_path / "redis").glob("appendonlydir.unreadable-*")), "damaged AOF not kept aside"
    finally:
        server.stop()

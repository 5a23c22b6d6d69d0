"""Issue 14 end to end: a real Label Studio, our backend (``defect-assist serve``), a real redis-server and
a real worker process.

The project's first model comes from 60 magnetic-tile folder normals (a worker job with local
images, as the stack starts it; PatchCore at 96 px). In Label Studio an annotator marks 3 tasks
normal and presses *Start training*: the ``START_TRAINING`` webhook reaches the backend, the worker
exports the annotations and retrains. The new version keeps the 60 folder normals (incremental:
the memory bank grows), passes the check and is served, and Label Studio's predictions under it
call the good test tiles of the project normal.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from worker_support import ROOT, backend_and_worker, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def stack(tmp_path: Path, label_studio, monkeypatch: pytest.MonkeyPatch):
    """Our backend, a redis-server and a worker around the session's Label Studio (no auto-retrain)."""
    from defect_assist.core.settings import get_settings
    from defect_assist_worker.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis")
    redis_url = server.start(detach=False)
    env = {
        "REDIS_URL": redis_url,
        "MODEL_DIR": str(tmp_path / "models"),
        "CACHE_DIR": str(tmp_path / "cache"),
        "QDRANT_PATH": str(tmp_path / "qdrant"),
        "DEVICE": "cpu",
        "MODEL_OPTIONS": json.dumps({"image_size": 96}),
        "AUTO_RETRAIN_AFTER": "0",
        "OMP_NUM_THREADS": "2",
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "PYTHONWARNINGS": "ignore",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    try:
        with backend_and_worker(tmp_path, "issue-14") as backend_url:
            yield {"ls": label_studio, "backend": backend_url, "tmp": tmp_path, "redis": redis_url}
    finally:
        server.stop()
        get_settings.cache_clear()


def _logs(stack) -> str:
    return "\n".join(
        (stack["tmp"] / n).read_text(errors="replace")[-3000:] for n in ("backend.log", "worker.log")
    )


def test_start_training_after_three_normals_keeps_the_folder_model(stack, magnetic_tile):
    import redis

    from defect_assist.core.store import ModelStore
    from defect_assist_worker.triggers import request_retrain

    train = sorted((magnetic_tile / "train" / "good").glob("*.jpg"))
    folder, annotated = train[::10][:60], train[3::200][:3]
    good_tiles = sorted((magnetic_tile / "test" / "good").glob("*.jpg"))[::12][:12]
    store = ModelStore(stack["tmp"] / "models")
    ls = httpx.Client(
        base_url=stack["ls"].url, headers={"Authorization": f"Token {stack['ls'].token}"}, timeout=60
    )
    config = (ROOT / "backend" / "defect_assist" / "label_studio" / "labeling_config.xml").read_text()
    project = stack["ls"].create_project("issue 14", config)
    pid = str(project)
    for folder_path, names in ((annotated[0].parent, annotated), (good_tiles[0].parent, good_tiles)):
        regex = "^(" + "|".join(re.escape(p.name) for p in names) + ")$"
        stack["ls"].import_local_files(project, folder_path, regex=regex)

    # the first model: 60 folder normals, a worker job with local images (as the stack starts it)
    request_retrain(
        pid, "stack: first model", images=[str(p) for p in folder], connection=redis.from_url(stack["redis"])
    )
    try:
        first = wait_for(lambda: store.current(pid), 400, 0.5, "first model")
    except TimeoutError:
        raise AssertionError(_logs(stack)) from None
    n_first = first.metadata["n_train_images"]
    assert n_first == len(first.metadata["extra"]["training_images"]) >= 50

    ml = ls.post("/api/ml", json={"project": project, "url": stack["backend"], "title": "defect-assist"})
    assert ml.status_code in (200, 201), ml.text
    tasks = ls.get("/api/tasks", params={"project": project, "page_size": 50}).json()["tasks"]
    assert len(tasks) == len(annotated) + len(good_tiles)
    names = {p.name for p in annotated}
    to_annotate = [t for t in tasks if str(next(iter(t["data"].values()))).rsplit("/", 1)[-1] in names]
    assert len(to_annotate) == 3
    for task in to_annotate:  # marked normal, as an annotator would
        verdict = {
            "from_name": "verdict",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": ["normal"]},
        }
        answer = ls.post(f"/api/tasks/{task['id']}/annotations", json={"result": [verdict]})
        assert answer.status_code == 201, answer.text

    trained = ls.post(f"/api/ml/{ml.json()['id']}/train")  # "Start training" → START_TRAINING webhook
    assert trained.status_code in (200, 201), trained.text
    try:
        version = wait_for(
            lambda: (v := store.versions(pid)) and len(v) == 2 and v[-1].version, 400, 0.5, "Start training"
        )
    except TimeoutError:
        raise AssertionError(_logs(stack)) from None
    second = store.version(pid, version)
    extra = second.metadata["extra"]
    assert second.status == "current", second.candidate_reason
    assert (extra["reason"], extra["source"], second.metadata["update"]) == (
        "START_TRAINING",
        "label-studio",
        "incremental",
    )
    assert second.metadata["n_train_images"] == n_first + 3  # the 60 folder normals are still there
    assert set(extra["training_images"]) >= set(first.metadata["extra"]["training_images"])
    assert extra["memory_bank"] >= first.metadata["extra"]["memory_bank"]
    assert extra["check"]["reason"].startswith(f"not worse than {first.version}")
    served = httpx.get(f"{stack['backend']}/versions", params={"project": project}, timeout=10).json()
    assert served["current"] == version

    # Label Studio asks the backend for predictions: the good tiles stay normal
    ls.post(
        "/api/dm/actions",
        params={"id": "retrieve_tasks_predictions", "project": project},
        json={"selectedItems": {"all": True, "excluded": []}},
    ).raise_for_status()

    def verdicts() -> dict[str, str] | None:
        found = {}
        for task in ls.get("/api/tasks", params={"project": project, "fields": "all"}).json()["tasks"]:
            for prediction in task.get("predictions", []):
                if prediction["model_version"] == version:
                    choice = next(r for r in prediction["result"] if r["type"] == "choices")
                    found[str(next(iter(task["data"].values()))).rsplit("/", 1)[-1]] = choice["value"][
                        "choices"
                    ][0]
        return found if len(found) == len(tasks) else None

    found = wait_for(verdicts, 120, 1, "predictions in Label Studio")
    anomalous = [name for name in (p.name for p in good_tiles) if found[name] != "normal"]
    assert len(anomalous) <= 2, f"good tiles called anomalous: {anomalous} (issue 14: 10 of 12)"

"""End to end with a real Label Studio, our backend, a real redis-server and a real worker process:
annotate tasks as normal through the LS API → LS's webhook reaches the backend → the auto-retrain
runs on its own → a new model_version is served and LS shows predictions under it.

Label Studio comes from the session fixture of ``tests/label_studio_server.py``.
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
    """Our backend, a redis-server and a worker around the session's Label Studio."""
    from defect_assist.core.settings import get_settings
    from defect_assist_worker.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis")
    redis_url = server.start(detach=False)
    env = {
        "REDIS_URL": redis_url,
        "MODEL_DIR": str(tmp_path / "models"),
        "CACHE_DIR": str(tmp_path / "cache"),
        "DEVICE": "cpu",
        "MODEL_OPTIONS": json.dumps({"image_size": 64}),
        "AUTO_RETRAIN_AFTER": "10",  # a first model needs at least 10 normals
        "AUTO_RETRAIN_DEBOUNCE": "1",
        "AUTO_RETRAIN_COOLDOWN": "0",
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "PYTHONWARNINGS": "ignore",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    try:
        with backend_and_worker(tmp_path, "e2e") as backend_url:
            yield {"ls": label_studio, "backend": backend_url, "tmp": tmp_path}
    finally:
        server.stop()
        get_settings.cache_clear()


def test_normal_annotations_in_label_studio_retrain_and_serve_new_version(stack, train_normals):
    from defect_assist.core.store import ModelStore

    ls = httpx.Client(
        base_url=stack["ls"].url, headers={"Authorization": f"Token {stack['ls'].token}"}, timeout=60
    )
    config = (ROOT / "backend" / "defect_assist" / "label_studio" / "labeling_config.xml").read_text()
    project = stack["ls"].create_project("worker-e2e", config)
    names = [p.name for p in train_normals[:12]]
    stack["ls"].import_local_files(
        project, train_normals[0].parent, regex="|".join(re.escape(n) for n in names)
    )
    ml = ls.post("/api/ml", json={"project": project, "url": stack["backend"], "title": "defect-assist"})
    assert ml.status_code in (200, 201), ml.text
    tasks = ls.get("/api/tasks", params={"project": project, "page_size": 50}).json()["tasks"]
    assert len(tasks) == 12
    for task in tasks[:10]:  # annotate as normal, as an annotator would
        answer = ls.post(
            f"/api/tasks/{task['id']}/annotations",
            json={
                "result": [
                    {
                        "from_name": "verdict",
                        "to_name": "image",
                        "type": "choices",
                        "value": {"choices": ["normal"]},
                    }
                ]
            },
        )
        assert answer.status_code == 201, answer.text

    store = ModelStore(stack["tmp"] / "models")
    try:
        version = wait_for(lambda: store.current_version(str(project)), 300, 0.5, "auto-retrained version")
    except TimeoutError:
        logs = "\n".join(
            (stack["tmp"] / n).read_text(errors="replace")[-3000:] for n in ("backend.log", "worker.log")
        )
        raise AssertionError(logs) from None
    meta = store.current(str(project)).metadata
    assert meta["n_train_images"] == 10 and meta["extra"]["source"] == "label-studio"
    assert "new normal annotations" in meta["extra"]["reason"]
    served = httpx.get(f"{stack['backend']}/versions", params={"project": project}, timeout=10).json()
    assert served["current"] == version

    # LS asks the backend for predictions and stores them under the new model_version
    ls.post(
        "/api/dm/actions",
        params={"id": "retrieve_tasks_predictions", "project": project},
        json={"selectedItems": {"all": True, "excluded": []}},
    ).raise_for_status()
    predictions = wait_for(
        lambda: [
            p
            for t in ls.get("/api/tasks", params={"project": project, "fields": "all"}).json()["tasks"]
            for p in t.get("predictions", [])
        ],
        60,
        1,
        "predictions in Label Studio",
    )
    assert {p["model_version"] for p in predictions} == {version}

    # "Start training" in LS (POST /api/ml/<id>/train → START_TRAINING webhook) → one more version
    trained = ls.post(f"/api/ml/{ml.json()['id']}/train")
    assert trained.status_code in (200, 201), trained.text
    newer = wait_for(
        lambda: (v := store.current_version(str(project))) != version and v, 300, 0.5, "Start training"
    )
    assert store.current(str(project)).metadata["extra"]["reason"] == "START_TRAINING"
    assert newer == "v0002-patchcore"

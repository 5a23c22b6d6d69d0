"""The ML backend app through real HTTP (FastAPI TestClient): protocol, order, errors, hot swap, auth."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from defect_assist.core.settings import Settings
from defect_assist.core.store import ModelStore
from defect_assist.label_studio.regions import rle_to_mask
from defect_assist.serving import create_app

pytestmark = pytest.mark.unit

CONFIG = (
    Path(__file__).resolve().parents[1] / "backend/defect_assist/label_studio/labeling_config.xml"
).read_text()


def _settings(tmp_path: Path, **extra: Any) -> Settings:
    return Settings(
        model_dir=tmp_path / "models",
        device="cpu",
        label_studio_url="http://127.0.0.1:9",
        label_studio_api_key="t",
        **extra,
    )


@pytest.fixture
def backend(tmp_path: Path):
    handled: list[dict] = []
    app = create_app(
        _settings(tmp_path), webhook_handler=lambda payload: handled.append(payload) or {"ok": 1}
    )
    with TestClient(app) as client:
        client.handled = handled  # type: ignore[attr-defined]
        client.store = ModelStore(tmp_path / "models")  # type: ignore[attr-defined]
        yield client


def _task(task_id: int, image: Path | str) -> dict[str, Any]:
    return {"id": task_id, "project": 5, "data": {"image": str(image)}}


def test_health_and_setup_before_any_model(backend: TestClient) -> None:
    assert backend.get("/health").json()["status"] == "UP"
    answer = backend.post(
        "/setup",
        json={
            "project": "5.1716549000",
            "schema": CONFIG,
            "hostname": "http://ls",
            "access_token": "x",
            "extra_params": {},
        },
    )
    assert answer.status_code == 200
    assert answer.json()["model_version"] == "no-model"
    assert set(answer.json()["fills"]) == {"defect_mask", "verdict", "defect_outline"}
    bad = backend.post(
        "/setup", json={"project": "5.1", "schema": "<View><Text name='t' value='$t'/></View>"}
    )
    assert bad.status_code == 400 and "no <Image>" in bad.json()["error"]


def test_predict_without_model_is_clean(backend: TestClient, test_images: dict[str, list[Path]]) -> None:
    answer = backend.post(
        "/predict",
        json={
            "tasks": [_task(1, test_images["normal"][0])],
            "project": "5.17",
            "label_config": CONFIG,
            "params": {"context": None},
        },
    )
    assert answer.status_code == 200
    assert answer.json()["results"] == []


def test_predict_keeps_order_survives_bad_tasks_and_hot_swaps(
    backend: TestClient, small_patchcore, test_images: dict[str, list[Path]], tmp_path: Path
) -> None:
    store: ModelStore = backend.store  # type: ignore[attr-defined]
    v1 = store.publish("5", small_patchcore).version
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    direct = small_patchcore.predict(test_images["anomalous"])
    best = max(range(len(direct)), key=lambda i: direct[i].score)
    normal, defect, expected = test_images["normal"][0], test_images["anomalous"][best], direct[best]
    assert expected.mask.any()
    tasks = [
        _task(1, defect),
        _task(2, tmp_path / "missing.jpg"),
        _task(3, normal),
        _task(4, broken),
        {"id": 5, "project": 5, "data": {}},
    ]
    answer = backend.post("/predict", json={"tasks": tasks, "project": 5, "label_config": CONFIG})
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert len(results) == 5
    assert [r["model_version"] for r in results[:1] + results[2:3]] == [v1] * 2
    assert results[1:2] + results[3:] == [[], [], []]  # failed tasks: no prediction, asked again later
    assert results[0]["score"] > results[2]["score"]
    verdicts = {r["from_name"]: r for r in results[0]["result"]}
    assert verdicts["verdict"]["value"]["choices"] == [expected.label]
    assert results[0]["score"] == pytest.approx(expected.score, abs=1e-5)
    width, height = Image.open(defect).size
    brush = verdicts["defect_mask"]
    assert (brush["original_width"], brush["original_height"]) == (width, height)
    mask = rle_to_mask(brush["value"]["rle"], height, width)
    assert mask.shape == (height, width) and mask.any()
    assert np.array_equal(mask, expected.mask)
    assert results[2]["result"][0]["value"]["choices"] == ["normal"]

    v2 = store.publish("5", small_patchcore).version  # a retrain elsewhere: picked up without restart
    assert v2 != v1
    assert backend.post("/setup", json={"project": "5.99", "schema": CONFIG}).json()["model_version"] == v2
    answer = backend.post("/predict", json={"tasks": tasks[:1], "project": "5"}).json()  # config from /setup
    assert answer["results"][0]["model_version"] == v2
    app_model = backend.app.state.model  # type: ignore[attr-defined]
    assert app_model.cached() == [("5", v2)]
    assert app_model.loads == 2
    assert backend.get("/versions", params={"project": "5"}).json() == {"versions": [v1, v2], "current": v2}
    assert backend.get("/versions").json()["versions"] == [v1, v2]


def test_webhook_answers_fast_and_hands_off(tmp_path: Path) -> None:
    release = threading.Event()
    handled: list[dict] = []

    def slow_handler(payload: dict) -> dict:
        release.wait(5)
        handled.append(payload)
        return {"status": "queued"}

    with TestClient(create_app(_settings(tmp_path), webhook_handler=slow_handler)) as client:
        started = time.perf_counter()
        answer = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 5}})
        elapsed = time.perf_counter() - started
        assert answer.status_code == 201 and answer.json()["action"] == "START_TRAINING"
        assert elapsed < 1.0
        assert handled == []  # still running in the background
        release.set()
        for _ in range(50):
            if handled:
                break
            time.sleep(0.05)
        assert handled[0]["action"] == "START_TRAINING"
        assert client.get("/webhook/stats").json() == {"counts": {"START_TRAINING:5": 1}, "handed_off": 1}
        assert "job" not in answer.json()  # a handler slower than Label Studio's timeout: no job id


def test_start_training_answer_carries_the_job_id(tmp_path: Path) -> None:
    def handler(payload: dict) -> dict:
        return {"status": "queued", "job_id": f"job-of-{payload['project']['id']}"}

    with TestClient(create_app(_settings(tmp_path), webhook_handler=handler)) as client:
        answer = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 5}}).json()
        assert (answer["job"], answer["job_status"], answer["progress"]) == ("job-of-5", "queued", None)


def test_webhook_without_worker_counts_events(tmp_path: Path) -> None:
    with TestClient(create_app(_settings(tmp_path), webhook_handler=None)) as client:
        for action in ("ANNOTATION_CREATED", "ANNOTATION_CREATED", "START_TRAINING"):
            assert client.post("/webhook", json={"action": action, "project": {"id": 3}}).status_code == 201
        assert client.get("/webhook/stats").json()["counts"] == {
            "ANNOTATION_CREATED:3": 2,
            "START_TRAINING:3": 1,
        }


def test_basic_auth(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path, basic_auth_user="ls", basic_auth_pass="pw"), webhook_handler=None)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 401
        assert client.get("/health", auth=("ls", "wrong")).status_code == 401
        token = base64.b64encode(b"ls:pw").decode()
        assert client.get("/health", headers={"Authorization": f"Basic {token}"}).json()["status"] == "UP"


def test_serve_command_is_registered() -> None:
    from defect_assist_tools.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    assert "--port" in result.output and "9090" in result.output


def test_images_fetched_with_the_token_label_studio_sends_at_setup(
    tmp_path: Path, small_patchcore, test_images: dict[str, list[Path]]
) -> None:
    """Without LABEL_STUDIO_API_KEY, /setup's hostname + access_token are used for relative URLs."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    image = test_images["normal"][0].read_bytes()

    class Media(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/data/upload/1/a.jpg" and self.headers.get("Authorization") == "Token owner"
            self.send_response(200 if ok else 401)
            self.end_headers()
            if ok:
                self.wfile.write(image)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Media)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = Settings(model_dir=tmp_path / "models", device="cpu", label_studio_api_key="")
        ModelStore(tmp_path / "models").publish("8", small_patchcore)
        with TestClient(create_app(settings, webhook_handler=None)) as client:
            hostname = f"http://127.0.0.1:{server.server_address[1]}"
            setup = {"project": "8.1", "schema": CONFIG, "hostname": hostname, "access_token": "owner"}
            assert client.post("/setup", json=setup).status_code == 200
            task = {"id": 1, "project": 8, "data": {"image": "/data/upload/1/a.jpg"}}
            results = client.post("/predict", json={"tasks": [task], "project": "8.1"}).json()["results"]
            assert results[0]["result"][0]["type"] == "choices"
    finally:
        server.shutdown()
        server.server_close()

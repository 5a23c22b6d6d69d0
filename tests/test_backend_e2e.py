"""End to end against a real Label Studio 1.23: LS calls our backend, stores and shows its predictions.

The backend runs under uvicorn on a free port (basic auth on); Label Studio reaches it over HTTP. When
a version is published the backend itself has Label Studio predict every task (its sync), a manual
*Retrieve predictions* at the same time leaves no duplicate, the older version's predictions go, and
the labeling page renders them, which a headless Chromium screenshots into ``artifacts/``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from browser import headless_browser, log_in_to_label_studio
from label_studio_server import LabelStudioProject, free_port
from PIL import Image

from defect_assist.core.settings import Settings
from defect_assist.core.store import ModelStore
from defect_assist.label_studio.regions import rle_to_mask
from defect_assist.serving import create_app
from defect_assist_tools.local_label_studio import DATASETS

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
AUTH = ("labelstudio", "backend-pass")


@dataclass
class RunningBackend:
    url: str
    store: ModelStore
    calls: list[tuple[str, str, int, str | None]] = field(default_factory=list)  # method, path, status, auth
    handed_off: list[dict[str, Any]] = field(default_factory=list)
    ml_id: int | None = None

    def paths(self) -> list[str]:
        return [path for _, path, _, _ in self.calls]


@pytest.fixture(scope="module")
def backend(
    label_studio_project: LabelStudioProject, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningBackend]:
    server = label_studio_project.server
    model_dir = tmp_path_factory.mktemp("e2e-models")
    settings = Settings(
        model_dir=model_dir,
        device="cpu",
        label_studio_url=server.url,
        label_studio_api_key=server.token,
        basic_auth_user=AUTH[0],
        basic_auth_pass=AUTH[1],
    )
    port = free_port()
    running = RunningBackend(f"http://127.0.0.1:{port}", ModelStore(model_dir))
    app = create_app(
        settings, webhook_handler=lambda payload: running.handed_off.append(payload) or {"ok": True}
    )

    @app.middleware("http")
    async def record(request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        running.calls.append(
            (request.method, request.url.path, response.status_code, request.headers.get("authorization"))
        )
        return response

    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    for _ in range(100):
        if uv.started:
            break
        time.sleep(0.1)
    yield running
    uv.should_exit = True
    thread.join(timeout=10)


def _predictions_by_task(project: LabelStudioProject) -> dict[int, list[dict[str, Any]]]:
    return {task["id"]: project.server.predictions(task["id"]) for task in project.server.tasks(project.id)}


def _wait_shown(project: LabelStudioProject, versions: list[str], timeout: float = 120.0) -> None:
    """Until every task carries exactly ``versions``' predictions (what the backend's sync leaves)."""
    deadline = time.monotonic() + timeout
    while True:
        found = {t: [p["model_version"] for p in ps] for t, ps in _predictions_by_task(project).items()}
        if all(sorted(v) == sorted(versions) for v in found.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"tasks' prediction versions after {timeout:.0f}s: {found}")
        time.sleep(1)


def test_label_studio_connects_through_health_and_setup(
    label_studio_project: LabelStudioProject, backend: RunningBackend
) -> None:
    ls = label_studio_project.server
    answer = ls.connect_backend(
        label_studio_project.id,
        backend.url,
        auth_method="BASIC_AUTH",
        basic_auth_user=AUTH[0],
        basic_auth_pass=AUTH[1],
    )
    backend.ml_id = int(answer["id"])
    assert answer.get("state") == "CO", answer  # connected
    # LS registers <backend>/webhook itself but sends it without the connection's basic auth
    assert ls.client.authorize_webhook(label_studio_project.id, backend.url, *AUTH) is not None
    assert {"/health", "/setup"} <= set(backend.paths())
    assert all(status == 200 and auth and auth.startswith("Basic ") for _, _, status, auth in backend.calls)

    ls.retrieve_predictions(label_studio_project.id)  # no model yet: clean empty answer, nothing stored
    assert ("POST", "/predict", 200) in [(m, p, s) for m, p, s, _ in backend.calls]
    assert all(not predictions for predictions in _predictions_by_task(label_studio_project).values())


def test_predictions_stored_in_label_studio(
    label_studio_project: LabelStudioProject, backend: RunningBackend, small_patchcore
) -> None:
    version = backend.store.publish(str(label_studio_project.id), small_patchcore).version
    ls = label_studio_project.server
    _wait_shown(label_studio_project, [version])  # the backend has LS predict every task, unasked
    scores: dict[str, list[float]] = {"normal": [], "anomalous": []}
    brushes = 0
    for task in ls.tasks(label_studio_project.id):
        predictions = ls.predictions(task["id"])
        assert [p["model_version"] for p in predictions] == [version]
        prediction = predictions[0]
        scores[label_studio_project.kind_of(task)].append(prediction["score"])
        path = DATASETS / task["data"]["image"].split("?d=", 1)[1]
        width, height = Image.open(path).size
        regions = {r["type"]: r for r in prediction["result"]}
        assert regions["choices"]["value"]["choices"][0] in ("normal", "anomalous")
        if "brushlabels" in regions:
            brushes += 1
            brush = regions["brushlabels"]
            assert (brush["original_width"], brush["original_height"]) == (width, height)
            mask = rle_to_mask(brush["value"]["rle"], height, width)
            assert mask.shape == (height, width) and mask.any()
            assert 0 < mask.mean() < 1
    assert brushes >= 1
    assert max(scores["anomalous"]) > max(scores["normal"])
    assert np.mean(scores["anomalous"]) > np.mean(scores["normal"])


def test_new_version_is_picked_up_without_restart(
    label_studio_project: LabelStudioProject, backend: RunningBackend, small_patchcore
) -> None:
    old = backend.store.current_version(str(label_studio_project.id))
    new = backend.store.publish(str(label_studio_project.id), small_patchcore).version
    assert new != old
    ls = label_studio_project.server
    ls.retrieve_predictions(label_studio_project.id)  # a user's manual retrieve racing the backend's own
    _wait_shown(label_studio_project, [new])  # one prediction per task, of the new version only
    assert ls.client.project(label_studio_project.id)["model_version"] == new  # the score column's version
    assert ls.client.get(f"/api/ml/{backend.ml_id}")["model_version"] == new
    versions = ls.client.get(f"/api/ml/{backend.ml_id}/versions")["versions"]
    assert versions == [old, new]


def test_a_task_whose_image_fails_gets_no_prediction_and_is_asked_again(
    label_studio_project: LabelStudioProject, backend: RunningBackend
) -> None:
    """A task the backend cannot read answers ``[]`` in its place: Label Studio stores nothing for it
    (no "normal, score 0" sorting it as the most normal task), keeps the others', and sends it again."""
    ls = label_studio_project.server
    project = label_studio_project.id
    version = backend.store.current_version(str(project))
    before = _predictions_by_task(label_studio_project)
    [broken] = ls.client.import_tasks(project, [{"image": "/data/local-files/?d=missing/no-such-image.png"}])
    try:
        for attempt in (1, 2):
            sent = sum(1 for _, path, status, _ in backend.calls if path == "/predict" and status == 200)
            ls.client.retrieve_predictions(project, [broken])
            wait_for_predict = time.monotonic() + 30
            while time.monotonic() < wait_for_predict and not (
                sum(1 for _, path, status, _ in backend.calls if path == "/predict" and status == 200) > sent
            ):
                time.sleep(0.2)
            assert ls.predictions(broken) == [], f"attempt {attempt}: a prediction was stored"
        # asked again: Label Studio only re-sends tasks without a prediction of the current version
        assert sum(1 for _, path, _, _ in backend.calls if path == "/predict") >= 2
        after = _predictions_by_task(label_studio_project)
        assert {t: [p["id"] for p in ps] for t, ps in after.items() if t != broken} == {
            t: [p["id"] for p in ps] for t, ps in before.items()
        }
        assert all(p["model_version"] == version for t, ps in after.items() if t != broken for p in ps)
    finally:
        ls.client.request("DELETE", f"/api/tasks/{broken}/")


def test_training_and_annotation_webhooks_are_handed_off(
    label_studio_project: LabelStudioProject, backend: RunningBackend
) -> None:
    ls = label_studio_project.server
    task = next(t for t in ls.tasks(label_studio_project.id) if label_studio_project.kind_of(t) == "normal")
    ls.client.post(
        f"/api/tasks/{task['id']}/annotations",
        {
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
    ls.client.post(f"/api/ml/{backend.ml_id}/train", {})
    for _ in range(100):
        actions = {p.get("action") for p in backend.handed_off}
        if {"START_TRAINING", "ANNOTATION_CREATED"} <= actions:
            break
        time.sleep(0.1)
    assert {"START_TRAINING", "ANNOTATION_CREATED"} <= actions
    start = next(p for p in backend.handed_off if p.get("action") == "START_TRAINING")
    assert str(start["project"]["id"]) == str(label_studio_project.id)
    exported = ls.client.export_tasks(label_studio_project.id)
    assert [t["id"] for t in exported] == [task["id"]]
    assert exported[0]["annotations"][0]["result"][0]["value"]["choices"] == ["normal"]


def test_labeling_page_screenshot(label_studio_project: LabelStudioProject, backend: RunningBackend) -> None:
    ls = label_studio_project.server
    tasks = ls.tasks(label_studio_project.id)
    task = next(
        t
        for t in tasks
        if label_studio_project.kind_of(t) == "anomalous"
        and any(r["type"] == "brushlabels" for p in ls.predictions(t["id"]) for r in p["result"])
    )
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    target = artifacts / "label-studio-prediction.png"
    with headless_browser() as browser:
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        log_in_to_label_studio(page, ls.url)
        page.goto(f"{ls.url}/projects/{label_studio_project.id}/data?task={task['id']}")
        page.wait_for_selector("canvas", timeout=90_000)
        page.wait_for_timeout(4000)  # image decode + brush layer
        page.screenshot(path=str(target))
    assert target.stat().st_size > 20_000

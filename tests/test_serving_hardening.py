"""Serving hardened: each bad input, untrusted URL or file, slow source and load case of
docs/reliability.md, against the backend running under uvicorn on 127.0.0.1 (basic auth on, token set),
with real local servers for images and Label Studio. Each case checks the answer, that the backend
still answers /health and that the good tasks of the same batch still get their predictions."""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving_fakes import FakeServer, chunked, png_header_only, running, send, trickle

from defect_assist.core.settings import Settings
from defect_assist.core.store import ModelStore
from defect_assist.label_studio.client import project_id
from defect_assist.label_studio.image_sources import HostRule, label_studio_path_ok
from defect_assist.serving import create_app
from defect_assist.serving.limits import FairLock
from defect_assist_tools.serve import exposure_warning

CONFIG = (
    Path(__file__).resolve().parents[1] / "backend/defect_assist/label_studio/labeling_config.xml"
).read_text()
AUTH = ("ls", "backend-pass")
TOKEN = "ls-secret-token"
FETCH_TIMEOUT = 2.5


@dataclass
class Stack:
    url: str
    ls: FakeServer
    images: FakeServer
    private: FakeServer  # a loopback server that is *not* allowed
    root: Path  # LOCAL_FILES_DOCUMENT_ROOT
    outside: Path  # a real image outside every root
    app: Any
    http: httpx.Client  # with the backend's credentials (one client: no TLS setup per call)

    def predict(self, tasks: list[Any], **extra: Any) -> httpx.Response:
        body = {"tasks": tasks, "project": "5.1", "label_config": CONFIG, **extra}
        return self.http.post(f"{self.url}/predict", json=body, timeout=60)

    def healthy(self) -> bool:
        return self.http.get(f"{self.url}/health", timeout=2).json()["status"] == "UP"


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, small_patchcore, test_images: dict[str, list[Path]]
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("hardening")
    good = test_images["normal"][0].read_bytes()
    root = tmp / "ls-files"
    (root / "tiles").mkdir(parents=True)
    shutil.copy(test_images["normal"][0], root / "tiles" / "good.jpg")
    (root / "tiles" / "bomb.png").write_bytes(png_header_only(20000, 20000))
    (root / "tiles" / "escape.jpg").symlink_to("/etc/passwd")
    outside = tmp / "outside.jpg"
    shutil.copy(test_images["normal"][0], outside)
    private = FakeServer({"/secret.jpg": lambda h: send(h, good)}).start()
    ls = FakeServer(
        {
            "/data/upload/1/good.jpg": lambda h: send(h, good),
            "/data/upload/1/to-images": lambda h: send(h, b"", 302, Location=f"{images.url}/good.jpg"),
            "/api/projects/": lambda h: send(h, b"[]"),
        }
    ).start()
    images = FakeServer(
        {
            "/good.jpg": lambda h: send(h, good),
            "/bomb.png": lambda h: send(h, png_header_only(20000, 20000)),
            "/garbage.jpg": lambda h: send(h, b"this is not an image" * 10),
            "/big.jpg": lambda h: send(h, b"\0" * (3 * 2**20)),
            "/big-chunked.jpg": chunked(3 * 2**20),
            "/trickle.jpg": trickle(1.0),
            "/to-ls-api": lambda h: send(h, b"", 302, Location=f"{ls.url}/api/projects/"),
            "/to-private": lambda h: send(h, b"", 302, Location=f"{private.url}/secret.jpg"),
            "/loop": lambda h: send(h, b"", 302, Location="/loop"),
        }
    ).start()
    models = tmp / "models"
    ModelStore(models).publish("5", small_patchcore)
    settings = Settings(
        model_dir=models,
        device="cpu",
        label_studio_url=ls.url,
        label_studio_api_key=TOKEN,
        basic_auth_user=AUTH[0],
        basic_auth_pass=AUTH[1],
        local_files_document_root=str(root),
        datasets_dir=tmp / "no-datasets",
        label_studio_sync=False,
        image_allowed_hosts=f"127.0.0.1:{images.port}",
        image_fetch_timeout=FETCH_TIMEOUT,
        max_image_bytes=2 * 2**20,
        max_request_bytes=2**20,
        max_tasks_per_request=50,
    )
    app = create_app(settings, webhook_handler=lambda payload: {"status": "queued"})
    with running(app) as url, httpx.Client(auth=AUTH) as http:
        yield Stack(url, ls, images, private, root, outside, app, http)
    for server in (ls, images, private):
        server.stop()


def _task(task_id: int, image: Any) -> dict[str, Any]:
    return {"id": task_id, "project": 5, "data": {"image": image}}


def _verdict(result: dict[str, Any]) -> list[str]:
    return [r["value"]["choices"][0] for r in result["result"] if r["type"] == "choices"]


# reference of the bad task (built from the stack) → why it is refused
BAD_IMAGES: dict[str, Any] = {
    "decompression bomb over HTTP": lambda s: f"{s.images.url}/bomb.png",
    "decompression bomb, local file": lambda s: "/data/local-files/?d=tiles/bomb.png",
    "not an image": lambda s: f"{s.images.url}/garbage.jpg",
    "over MAX_IMAGE_BYTES (Content-Length)": lambda s: f"{s.images.url}/big.jpg",
    "over MAX_IMAGE_BYTES (chunked)": lambda s: f"{s.images.url}/big-chunked.jpg",
    "HTTP 404": lambda s: f"{s.images.url}/missing.jpg",
    "file:///etc/passwd": lambda s: "file:///etc/passwd",
    "/etc/passwd": lambda s: "/etc/passwd",
    "/proc/self/environ": lambda s: "/proc/self/environ",
    "image outside every local root": lambda s: str(s.outside),
    "local-files traversal": lambda s: "/data/local-files/?d=../../../../etc/passwd",
    "local-files absolute": lambda s: "/data/local-files/?d=/etc/passwd",
    "symlink out of the root": lambda s: "/data/local-files/?d=tiles/escape.jpg",
    "Label Studio /data/../api": lambda s: "/data/../api/projects/",
    "Label Studio %2e%2e": lambda s: "/data/%2e%2e/api/projects/",
    "Label Studio API, absolute": lambda s: f"{s.ls.url}/api/projects/",
    "loopback host not allowed": lambda s: f"{s.private.url}/secret.jpg",
    "localhost by name": lambda s: f"http://localhost:{s.private.port}/secret.jpg",
    "link-local metadata": lambda s: "http://169.254.169.254/latest/meta-data/",
    "0.0.0.0": lambda s: f"http://0.0.0.0:{s.private.port}/secret.jpg",
    "redirect to the Label Studio API": lambda s: f"{s.images.url}/to-ls-api",
    "redirect to a private host": lambda s: f"{s.images.url}/to-private",
    "redirect loop": lambda s: f"{s.images.url}/loop",
    "ftp scheme": lambda s: "ftp://example.com/a.jpg",
    "data URI": lambda s: "data:image/png;base64,AAAA",
    "relative path": lambda s: "tiles/good.jpg",
    "image is a number": lambda s: 12,
    "image is a list": lambda s: ["a.jpg"],
}
BAD_TASKS: dict[str, Any] = {
    "task null": None,
    "task a string": "task",
    "data a list": {"id": 9, "data": ["a.jpg"]},
    "data missing": {"id": 9},
    "no image key": {"id": 9, "data": {"text": "x", "other": "y"}},
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_a_bad_image_only_empties_its_task(stack: Stack, case: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="defect_assist.serving.batch")
    good = "/data/local-files/?d=tiles/good.jpg"
    answer = stack.predict(
        [_task(1, good), _task(2, BAD_IMAGES[case](stack)), _task(3, f"{stack.images.url}/good.jpg")]
    )
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == 3
    assert results[1] == []  # no prediction stored: Label Studio asks again later
    assert _verdict(results[0]) and _verdict(results[2])  # the good tasks of the batch
    assert any("task 2" in record.getMessage() for record in caplog.records), "no logged reason"
    assert stack.healthy()
    assert "/api/projects/" not in stack.ls.paths()  # never the Label Studio API
    assert not stack.private.requests  # a private host not allowed is never contacted
    assert all(auth is None for _, auth in stack.images.requests)  # the token only goes to LS


@pytest.mark.integration
@pytest.mark.parametrize("case", list(BAD_TASKS))
def test_a_bad_task_among_good_ones_only_empties_itself(stack: Stack, case: str) -> None:
    answer = stack.predict([_task(1, "/data/upload/1/good.jpg"), BAD_TASKS[case]])
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert _verdict(results[0]) and results[1] == []
    assert stack.healthy()


@pytest.mark.integration
def test_label_studio_images_carry_the_token_and_redirects_drop_it(stack: Stack) -> None:
    answer = stack.predict([_task(1, "/data/upload/1/good.jpg"), _task(2, "/data/upload/1/to-images")])
    results = answer.json()["results"]
    assert _verdict(results[0]) and _verdict(results[1])
    ls_auth = {auth for path, auth in stack.ls.requests if path.startswith("/data/upload/1/")}
    assert ls_auth == {f"Token {TOKEN}"}
    assert all(auth is None for _, auth in stack.images.requests)


WRONG_SHAPES: list[tuple[str, str, Any, int]] = [
    ("/predict", "body a list", [], 400),
    ("/predict", "body a string", "tasks", 400),
    ("/predict", "tasks a dict", {"tasks": {"id": 1}, "project": 5}, 400),
    ("/predict", "tasks a string", {"tasks": "abc", "project": 5}, 400),
    ("/predict", "only task null", {"tasks": [None], "project": 5}, 400),
    ("/predict", "only task with data a list", {"tasks": [{"data": []}], "project": 5}, 400),
    ("/predict", "label_config an int", {"tasks": [_task(1, "a")], "project": 5, "label_config": 1}, 400),
    ("/predict", "params a string", {"tasks": [_task(1, "a")], "project": 5, "params": "x"}, 400),
    ("/predict", "project ²", {"tasks": [_task(1, "a")], "project": "²"}, 400),
    ("/predict", "project a list", {"tasks": [_task(1, "a")], "project": [5]}, 400),
    ("/predict", "too many tasks", {"tasks": [_task(i, "a") for i in range(51)], "project": 5}, 413),
    ("/setup", "body a list", [CONFIG], 400),
    ("/setup", "schema an int", {"project": "5.1", "schema": 3}, 400),
    ("/setup", "project ²", {"project": "²", "schema": CONFIG}, 400),
    ("/setup", "project Arabic-Indic digits", {"project": "\u0665", "schema": CONFIG}, 400),
    ("/webhook", "a JSON string", "ANNOTATION_CREATED", 400),
    ("/webhook", "a list", [{"action": "START_TRAINING"}], 400),
    ("/webhook", "action an int", {"action": 3}, 400),
    ("/train", "a list", [5], 400),
]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("route", "case", "body", "expected"), WRONG_SHAPES, ids=[c[1] for c in WRONG_SHAPES]
)
def test_valid_json_of_the_wrong_shape_is_a_client_error(
    stack: Stack, route: str, case: str, body: Any, expected: int
) -> None:
    answer = stack.http.post(f"{stack.url}{route}", json=body, timeout=30)
    assert answer.status_code == expected, (case, answer.text)
    assert stack.healthy()


@pytest.mark.integration
@pytest.mark.parametrize("route", ["/predict", "/setup", "/webhook", "/train"])
def test_invalid_json_is_a_400(stack: Stack, route: str) -> None:
    for raw in (b"{not json", b"", b"[" * 100_000):
        answer = stack.http.post(f"{stack.url}{route}", content=raw, timeout=30)
        assert answer.status_code == 400, (route, raw[:10], answer.text)
    assert stack.healthy()


def _raw_request(url: str, head: str, body: bytes = b"", timeout: float = 3.0) -> tuple[bytes, float]:
    """Send a request head (and maybe part of a body) on a raw socket; the status line and its time."""
    host, port = url.removeprefix("http://").split(":")
    started = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode() + body)
        status = sock.recv(200).split(b"\r\n", 1)[0]
    return status, time.perf_counter() - started


@pytest.mark.integration
def test_auth_is_checked_and_size_refused_before_the_body_is_read(stack: Stack) -> None:
    head = (
        "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n"
    )
    status, elapsed = _raw_request(stack.url, head + "\r\n", b"{")  # 50 MB announced, 1 byte sent
    assert b" 401 " in status and elapsed < 2.0
    status, elapsed = _raw_request(
        stack.url, head + "Authorization: Basic bHM6YmFja2VuZC1wYXNz\r\n\r\n", b"{"
    )
    assert b" 413 " in status and elapsed < 2.0

    def stream() -> Iterator[bytes]:  # chunked: no Content-Length to refuse by
        for _ in range(40):
            yield b" " * 65536

    answer = stack.http.post(f"{stack.url}/predict", content=stream(), timeout=30)
    assert answer.status_code == 413
    assert stack.healthy()


@pytest.mark.integration
@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/health", "/webhook/stats"])
def test_every_route_needs_credentials(stack: Stack, path: str) -> None:
    assert httpx.get(f"{stack.url}{path}", timeout=5).status_code == 401
    assert httpx.get(f"{stack.url}{path}", auth=("ls", "wrong"), timeout=5).status_code == 401
    assert httpx.get(f"{stack.url}{path}", auth=AUTH, timeout=5).status_code == 200


@pytest.mark.integration
def test_a_trickling_source_is_cut_at_the_total_deadline(stack: Stack) -> None:
    started = time.perf_counter()
    answer = stack.predict([_task(1, f"{stack.images.url}/trickle.jpg"), _task(2, "/data/upload/1/good.jpg")])
    elapsed = time.perf_counter() - started
    results = answer.json()["results"]
    assert results[0] == [] and _verdict(results[1])
    assert FETCH_TIMEOUT - 0.2 < elapsed < FETCH_TIMEOUT + 2.0, elapsed  # a byte a second: no read timeout


@pytest.mark.integration
def test_a_small_request_is_answered_while_a_slow_batch_is_in_flight(stack: Stack) -> None:
    slow: dict[str, float] = {}

    def slow_batch() -> None:
        started = time.perf_counter()
        tasks = [_task(i, f"{stack.images.url}/trickle.jpg?{i}") for i in range(16)]
        assert stack.predict(tasks).status_code == 200
        slow["elapsed"] = time.perf_counter() - started

    thread = threading.Thread(target=slow_batch)
    thread.start()
    time.sleep(0.5)
    started = time.perf_counter()
    answer = stack.predict([_task(1, f"{stack.images.url}/good.jpg")])
    small = time.perf_counter() - started
    assert _verdict(answer.json()["results"][0])
    thread.join(60)
    assert small < 2.0, small  # not behind the 16 slow fetches
    assert slow["elapsed"] >= FETCH_TIMEOUT, slow  # which were still in flight
    assert stack.healthy()


@pytest.mark.integration
def test_client_growable_state_is_bounded(stack: Stack) -> None:
    model = stack.app.state.model
    for i in range(300):
        body = {"action": f"ANNOTATION_CREATED_{i}", "project": {"id": 1000 + i}}
        assert stack.http.post(f"{stack.url}/webhook", json=body, timeout=5).status_code == 201
    counts = stack.http.get(f"{stack.url}/webhook/stats", timeout=5).json()["counts"]
    assert len(counts) <= model.limits.max_webhook_keys + 1 and counts.get("other", 0) > 0
    assert len(model.webhook_results) <= model.limits.max_webhook_results
    for i in range(model.limits.max_label_configs + 20):
        config = CONFIG.replace("<View>", f"<View><!-- {i} -->", 1)
        setup = {"project": f"{2000 + i}.1", "schema": config}
        assert stack.http.post(f"{stack.url}/setup", json=setup, timeout=5).status_code == 200
    assert len(model._specs) <= model.limits.max_label_configs
    assert stack.healthy()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.1.10", False),
        ("172.16.0.1", False),
        ("100.64.0.1", False),
        ("169.254.169.254", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("fe80::1", False),
        ("224.0.0.1", False),
    ],
)
def test_default_host_rule(address: str, allowed: bool) -> None:
    assert HostRule().allows("images.example.com", 443, ipaddress.ip_address(address)) is allowed


@pytest.mark.unit
def test_explicit_host_rules() -> None:
    rule = HostRule("files.lan, 10.0.0.0/8, 127.0.0.1:9000")
    assert rule.allows("files.lan", 80, ipaddress.ip_address("192.168.0.5"))
    assert rule.allows("x", 80, ipaddress.ip_address("10.9.9.9"))
    assert rule.allows("127.0.0.1", 9000, ipaddress.ip_address("127.0.0.1"))
    assert not rule.allows("127.0.0.1", 9001, ipaddress.ip_address("127.0.0.1"))
    private = HostRule(allow_private=True)
    assert private.allows("x", 80, ipaddress.ip_address("10.0.0.1"))
    assert private.allows("x", 80, ipaddress.ip_address("127.0.0.1"))
    assert not private.allows("x", 80, ipaddress.ip_address("169.254.169.254"))
    assert not private.allows("x", 80, ipaddress.ip_address("0.0.0.0"))


@pytest.mark.unit
@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/data/upload/1/a.jpg", True),
        ("/data/local-files/", True),
        ("/data/../api/projects/", False),
        ("/data/%2e%2e/api/projects/", False),
        ("/data/%252e%252e/api/", False),
        ("/data/./x", False),
        ("/data\\..\\api", False),
        ("/api/projects/", False),
        ("/datax/a.jpg", False),
    ],
)
def test_label_studio_media_paths(path: str, ok: bool) -> None:
    assert label_studio_path_ok(path) is ok


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("5", True),
        ("5.1716", True),
        (7, True),
        ({"id": 3}, True),
        ("²", False),
        ("\u0665", False),
        ("-1", False),
        ("1" * 30, False),
        (True, False),
        ("", False),
    ],
)
def test_project_ids_are_ascii_digits(value: Any, ok: bool) -> None:
    if ok:
        assert project_id(value).isascii()
    else:
        with pytest.raises(ValueError):
            project_id(value)


@pytest.mark.unit
def test_serve_binds_loopback_and_warns_without_auth() -> None:
    import inspect

    from defect_assist_tools.serve import serve

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    open_settings = Settings(basic_auth_user="")
    assert exposure_warning("127.0.0.1", open_settings) is None
    assert exposure_warning("localhost", open_settings) is None
    warning = exposure_warning("0.0.0.0", open_settings)
    assert warning and "0.0.0.0" in warning and "BASIC_AUTH_USER" in warning
    assert "10.0.0.5" in (exposure_warning("10.0.0.5", open_settings) or "")
    assert exposure_warning("0.0.0.0", Settings(basic_auth_user="u", basic_auth_pass="p")) is None


@pytest.mark.unit
def test_fair_lock_grants_in_arrival_order() -> None:
    lock, order = FairLock(), []
    lock.acquire()
    threads = []
    for i in range(5):
        thread = threading.Thread(target=lambda i=i: (lock.acquire(), order.append(i), lock.release()))
        thread.start()
        threads.append(thread)
        time.sleep(0.05)  # arrive one after the other
    lock.release()
    for thread in threads:
        thread.join(5)
    assert order == list(range(5))


@pytest.mark.integration
def test_request_deadline_answers_the_rest_empty(tmp_path: Path, small_patchcore, stack: Stack) -> None:
    ModelStore(tmp_path / "models").publish("5", small_patchcore)
    settings = Settings(
        model_dir=tmp_path / "models",
        device="cpu",
        label_studio_url=stack.ls.url,
        label_studio_api_key=TOKEN,
        label_studio_sync=False,
        image_allowed_hosts=f"127.0.0.1:{stack.images.port}",
        image_fetch_timeout=30,
        predict_timeout=1.5,
        datasets_dir=tmp_path,
    )
    with running(create_app(settings, webhook_handler=None)) as url, httpx.Client() as http:
        tasks = [_task(1, "/data/upload/1/good.jpg"), _task(2, f"{stack.images.url}/trickle.jpg?deadline")]
        body = {"tasks": tasks, "project": 5, "label_config": CONFIG}
        http.post(f"{url}/predict", json={**body, "tasks": tasks[:1]}, timeout=60)  # loads the model
        started = time.perf_counter()
        answer = http.post(f"{url}/predict", json=body, timeout=30)
        elapsed = time.perf_counter() - started
    results = answer.json()["results"]
    assert answer.status_code == 200 and _verdict(results[0]) and results[1] == []
    assert elapsed < 1.5 + 2.0, elapsed
    assert os.getpid()  # same process, still here


@pytest.mark.unit
def test_similar_by_path_neither_opens_nor_reveals_server_files(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from defect_assist.serving.similarity_routes import router

    root = tmp_path / "root"
    root.mkdir()
    (root / "bomb.png").write_bytes(png_header_only(20000, 20000))
    settings = Settings(
        model_dir=tmp_path / "models",
        device="cpu",
        label_studio_url="http://127.0.0.1:9",
        label_studio_sync=False,
        image_local_roots=str(root),
        datasets_dir=tmp_path / "none",
    )
    with TestClient(create_app(settings, webhook_handler=None, routers=[router])) as client:
        answers = {
            path: client.get("/similar", params={"path": path})
            for path in ("/etc/passwd", "/etc/no-such-file", "/proc/self/environ", str(root / "missing.png"))
        }
        assert {a.status_code for a in answers.values()} == {404}
        assert len({a.json()["detail"].split(":")[0] for a in answers.values()}) == 1  # one answer for all
        assert client.get("/similar", params={"path": str(root / "bomb.png")}).status_code == 422

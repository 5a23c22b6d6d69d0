"""What one client may cost the backend: request limits, auth before the body, bounded state, a fair lock.

- :class:`ServingLimits`: the limits from the settings (``MAX_IMAGE_PIXELS`` …, docs/reliability.md).
- :class:`GuardMiddleware` (pure ASGI): basic auth checked from the headers *before* any body byte is
  read (every route, ``/docs`` and ``/openapi.json`` included), then the body read in chunks up to
  ``MAX_REQUEST_BYTES`` (a larger ``Content-Length`` or stream answers 413 at once) and replayed.
- :class:`LRUDict`: a capped dict for client-growable caches; :class:`FairLock`: a FIFO lock, so the
  chunks of a long batch and a short request take turns on the prediction lock.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from defect_assist.core.settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class ServingLimits:
    """Per-image, per-request and per-process bounds (defaults: the settings' defaults)."""

    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 50 * 2**20
    max_request_bytes: int = 16 * 2**20
    max_tasks_per_request: int = 1000
    image_fetch_timeout: float = 15.0
    image_fetch_threads: int = 8
    predict_timeout: float = 80.0
    predict_chunk: int = 4
    max_label_configs: int = 128  # parsed labeling configs kept (LRU)
    max_projects: int = 1000  # projects whose /setup schema and token are kept (LRU)
    max_webhook_keys: int = 256  # distinct "event:project" webhook counters; then "other"
    max_webhook_results: int = 100  # hand-off answers kept for inspection
    max_pending_webhooks: int = 1000  # queued hand-offs; more are dropped (counted)

    @classmethod
    def from_settings(cls, settings: Settings) -> ServingLimits:
        return cls(
            max_image_pixels=settings.max_image_pixels,
            max_image_bytes=settings.max_image_bytes,
            max_request_bytes=settings.max_request_bytes,
            max_tasks_per_request=settings.max_tasks_per_request,
            image_fetch_timeout=settings.image_fetch_timeout,
            image_fetch_threads=max(1, settings.image_fetch_threads),
            predict_timeout=settings.predict_timeout,
            predict_chunk=max(1, settings.predict_chunk),
        )


class LRUDict(Generic[K, V]):
    """A dict holding at most ``capacity`` items, dropping the least recently used (thread-safe)."""

    def __init__(self, capacity: int, on_evict: Callable[[V], None] | None = None) -> None:
        self.capacity = max(1, capacity)
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self._on_evict = on_evict

    def get(self, key: K, default: V | None = None) -> V | None:
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key]

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __setitem__(self, key: K, value: V) -> None:
        evicted: list[V] = []
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                evicted.append(self._items.popitem(last=False)[1])
        if self._on_evict is not None:
            for old in evicted:
                self._on_evict(old)

    def __len__(self) -> int:
        return len(self._items)

    def values(self) -> list[V]:
        with self._lock:
            return list(self._items.values())


class FairLock:
    """A mutex granted in arrival order (``threading.Lock`` lets a releasing thread barge back in)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._waiters: deque[threading.Event] = deque()
        self._held = False

    def acquire(self) -> None:
        with self._guard:
            if not self._held and not self._waiters:
                self._held = True
                return
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()  # ownership is handed over by release()

    def release(self) -> None:
        with self._guard:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._held = False

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _credentials_ok(headers: list[tuple[bytes, bytes]], user: str, password: str) -> bool:
    value = next((v for k, v in headers if k.lower() == b"authorization"), b"")
    scheme, _, encoded = value.partition(b" ")
    if scheme.lower() != b"basic":
        return False
    try:
        given_user, sep, given_password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return False
    return bool(sep) and (
        secrets.compare_digest(given_user, user.encode())
        & secrets.compare_digest(given_password, password.encode())
    )


async def _answer(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class GuardMiddleware:
    """Basic auth from the headers, then a size-bounded body read, before the app sees the request."""

    def __init__(self, app: ASGIApp, user: str = "", password: str = "", max_body: int = 16 * 2**20) -> None:
        self.app = app
        self.user = user
        self.password = password
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers") or [])
        if self.user and not _credentials_ok(headers, self.user, self.password):
            await _answer(send, 401, {"detail": "basic auth required"}, [(b"www-authenticate", b"Basic")])
            return
        too_large = {"detail": f"request body larger than {self.max_body} bytes (MAX_REQUEST_BYTES)"}
        length = next((v for k, v in headers if k.lower() == b"content-length"), None)
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_body):
            await _answer(
                send, 413 if length.strip().isdigit() else 400, too_large, [(b"connection", b"close")]
            )
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _answer(send, 413, too_large, [(b"connection", b"close")])
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

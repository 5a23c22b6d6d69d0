"""Where a task's image may come from, and fetching it within a byte limit and a total deadline.

Allowed (everything else is refused for that task, docs/reliability.md):

- the Label Studio host of the project (``LABEL_STUDIO_URL``, or the ``hostname`` /setup sent when no
  ``LABEL_STUDIO_API_KEY`` is set): only its ``/data/`` paths, percent-decoded and without ``..``
  segments, never its API; the Label Studio token is sent there and nowhere else;
- local files under the configured roots (``LOCAL_FILES_DOCUMENT_ROOT``, ``IMAGE_LOCAL_ROOTS``,
  ``DATASETS_DIR``), resolved (no traversal, no symlink escape), regular files only;
- other http(s) hosts whose resolved address is public; loopback, private, link-local and unspecified
  addresses only when listed in ``IMAGE_ALLOWED_HOSTS`` (or, loopback/private, with
  ``ALLOW_PRIVATE_IMAGE_HOSTS``). The address checked is the address connected to (no DNS rebinding),
  and every redirect hop is checked again.

Bodies and files are read in chunks up to ``MAX_IMAGE_BYTES``; :class:`Fetch` can be aborted from
another thread (its socket is shut down), which is how the caller enforces the total deadline.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import posixpath
import re
import socket
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import httpcore

from defect_assist.core.settings import Settings

CHUNK = 256 * 1024
MAX_REDIRECTS = 5
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ImageRefused(Exception):
    """The reference points somewhere images may not come from (or at nothing readable there)."""


class ImageFetchError(Exception):
    """The source is allowed but the image could not be fetched (HTTP error, too large, too slow)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status when the source answered one


@dataclass(frozen=True)
class LabelStudioOrigin:
    """A project's Label Studio: its base URL and the token images on it are fetched with."""

    url: str
    token: str = ""


def origin_of(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of an http(s) URL, host lower-case, default ports filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def describe(reference: str) -> str:
    """A reference safe to log: no query string (presigned URLs carry signatures), bounded length."""
    text = str(reference)
    if "/data/local-files" in text:
        relative = parse_qs(urlsplit(text).query).get("d", [""])[0]
        return f"local-files:{relative[:200]}"
    return text.split("?", 1)[0][:200]


def _unquoted(path: str) -> str:
    for _ in range(3):  # "%252e%252e" → "%2e%2e" → ".."
        path = unquote(path)
    return path


def label_studio_path_ok(path: str) -> bool:
    """A Label Studio media path: under ``/data/`` after decoding, no ``.``/``..`` segment, no ``\\``."""
    decoded = _unquoted(path)
    if "\\" in decoded or any(segment in (".", "..") for segment in decoded.split("/")):
        return False
    return posixpath.normpath(decoded).startswith("/data/")


class HostRule:
    """Which (host, port, resolved address) may be fetched from, for hosts other than Label Studio."""

    def __init__(self, allowed_hosts: str = "", allow_private: bool = False) -> None:
        self.names: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in (e.strip().lower() for e in allowed_hosts.split(",")):
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.names.add(entry)
        self.allow_private = allow_private

    @staticmethod
    def public(ip: IPAddress) -> bool:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_global and not ip.is_multicast

    def allows(self, host: str, port: int, ip: IPAddress) -> bool:
        host = host.lower().strip("[]")
        if host in self.names or f"{host}:{port}" in self.names or any(ip in n for n in self.networks):
            return True
        if self.public(ip):
            return True
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
        unspecified = mapped.is_unspecified or mapped in ipaddress.ip_network("0.0.0.0/8")
        return (
            self.allow_private
            and (mapped.is_private or mapped.is_loopback)
            and not (mapped.is_link_local or unspecified or mapped.is_multicast)
        )


class _GuardedBackend(httpcore.SyncBackend):
    """Connects only to addresses the rule allows (checked on the address actually connected to)."""

    def __init__(self, rule: HostRule, trusted: set[tuple[str, int]]) -> None:
        self.rule = rule
        self.trusted = trusted  # Label Studio hosts: configured, not task data

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, **kwargs: Any) -> Any:
        if (host.lower(), port) in self.trusted:
            return super().connect_tcp(host, port, timeout, **kwargs)
        try:
            infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
        except OSError as error:
            raise ImageFetchError(f"cannot resolve {host}: {error}") from error
        for info in infos:
            ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if self.rule.allows(host, port, ip):
                return super().connect_tcp(str(ip), port, timeout, **kwargs)
        raise ImageRefused(
            f"host {host} resolves to a non-public address ({infos[0][4][0] if infos else '?'}); "
            "allow it with IMAGE_ALLOWED_HOSTS"
        )


class Fetch:
    """One fetch's abort handle: :meth:`abort` shuts its socket so a blocked read returns at once."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.aborted = False
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()

    def attach(self, response: httpcore.Response) -> None:
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._lock:
            self._socket = sock
            if self.aborted:
                self._shutdown()

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)


class LocalRoots:
    """Folders local images may be read from; a path outside, missing or not a file: one refusal."""

    def __init__(self, roots: Iterable[str | Path]) -> None:
        resolved = []
        for root in roots:
            if root and str(root).strip():
                path = Path(str(root).strip()).expanduser()
                if path.is_dir():
                    resolved.append(path.resolve())
        self.roots = list(dict.fromkeys(resolved))

    def resolve(self, path: str | Path, root: Path | None = None) -> Path:
        candidate = Path(path)
        if root is not None:
            candidate = root / candidate
        refused = ImageRefused(f"{str(path)[:200]!r} is not a readable image under an allowed local root")
        if not candidate.is_absolute():
            raise refused
        try:
            real = candidate.resolve(strict=True)
        except (OSError, RuntimeError, ValueError):  # ValueError: an embedded NUL byte
            raise refused from None
        roots = [root.resolve()] if root is not None else self.roots
        if not any(real.is_relative_to(r) for r in roots) or not real.is_file():
            raise refused
        return real

    def read(self, path: Path, max_bytes: int) -> bytes:
        """A resolved file's bytes in chunks, at most ``max_bytes`` (regular files only, no symlink)."""
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags)
        except OSError as error:
            raise ImageRefused(f"cannot open {path}: {error.strerror}") from error
        with os.fdopen(fd, "rb", buffering=0) as handle:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ImageRefused(f"{path} is not a regular file")
            if info.st_size > max_bytes:
                raise ImageFetchError(f"{path}: {info.st_size} bytes, more than MAX_IMAGE_BYTES={max_bytes}")
            data = bytearray()
            while chunk := handle.read(CHUNK):
                data += chunk
                if len(data) > max_bytes:
                    raise ImageFetchError(f"{path}: more than MAX_IMAGE_BYTES={max_bytes}")
        return bytes(data)


class ImageSources:
    """The image source rule and the bounded fetch, shared by every request of the backend."""

    def __init__(
        self,
        label_studio_url: str,
        local_files_root: str | Path | None = None,
        local_roots: Iterable[str | Path] = (),
        allowed_hosts: str = "",
        allow_private: bool = False,
        max_bytes: int = 50 * 2**20,
    ) -> None:
        self.label_studio_url = label_studio_url.rstrip("/")
        self.local_files_root = LocalRoots([local_files_root or ""]).roots[:1]
        self.local = LocalRoots([*(self.local_files_root), *local_roots])
        self.rule = HostRule(allowed_hosts, allow_private)
        self.max_bytes = max_bytes
        self._trusted: set[tuple[str, int]] = set()
        self._label_studio: set[tuple[str, str, int]] = set()
        self.trust(self.label_studio_url)
        self.pool = httpcore.ConnectionPool(
            network_backend=_GuardedBackend(self.rule, self._trusted),
            max_connections=256,
            max_keepalive_connections=32,
            keepalive_expiry=10.0,
        )

    def trust(self, label_studio_url: str) -> None:
        """Add a Label Studio host (the configured one, or one /setup names when no API key is set)."""
        scheme, host, port = origin_of(label_studio_url)
        if scheme in ("http", "https") and host:
            self._trusted.add((host, port))
            self._label_studio.add((scheme, host, port))

    @classmethod
    def from_settings(cls, settings: Settings, max_bytes: int) -> ImageSources:
        """The rule of these settings: LS host, local roots (``LOCAL_FILES_DOCUMENT_ROOT``,
        ``IMAGE_LOCAL_ROOTS``, ``DATASETS_DIR``) and the host rule (docs/reliability.md)."""
        roots = [r for r in settings.image_local_roots.split(os.pathsep) if r.strip()]
        return cls(
            settings.label_studio_url,
            local_files_root=settings.local_files_document_root or None,
            local_roots=[settings.local_files_document_root, *roots, settings.datasets_dir],
            allowed_hosts=settings.image_allowed_hosts,
            allow_private=settings.allow_private_image_hosts,
            max_bytes=max_bytes,
        )

    def on_label_studio(self, reference: str) -> bool:
        """Whether ``reference`` is fetched from a Label Studio host (relative ``/data/`` or its URL)."""
        text = str(reference).strip()
        if text.startswith(("/data/", "data/")):
            return True
        return text.startswith(("http://", "https://")) and origin_of(text) in self._label_studio

    def close(self) -> None:
        self.pool.close()

    # ------------------------------------------------------------------ references
    def local_path(self, reference: str) -> Path | None:
        """The local file a reference names (None: not a local reference); ImageRefused outside the roots."""
        text = str(reference).strip()
        parts = urlsplit(text)
        relative_ls = text.startswith(("/data/", "data/"))
        on_ls = text.startswith(("http://", "https://")) and origin_of(text) in self._label_studio
        media_path = posixpath.normpath("/" + _unquoted(parts.path).lstrip("/"))
        if (relative_ls or on_ls) and media_path == "/data/local-files":
            if self.local_files_root:
                relative = parse_qs(parts.query).get("d", [""])[0]
                return self.local.resolve(relative, root=self.local_files_root[0])
            return None
        if relative_ls or text.startswith(("http://", "https://")):
            return None
        if text.startswith("file://"):
            if parts.netloc not in ("", "localhost"):
                raise ImageRefused("file:// URLs of other hosts are not read")
            return self.local.resolve(unquote(parts.path))
        if _SCHEME.match(text):
            raise ImageRefused(f"scheme {text.split(':', 1)[0]!r} is not an image source")
        return self.local.resolve(text)

    def fetch(self, reference: str, label_studio: LabelStudioOrigin, deadline: float, handle: Fetch) -> bytes:
        """The image's bytes; ImageRefused (source not allowed) or ImageFetchError (failed, too big/slow)."""
        text = str(reference).strip()
        if not text:
            raise ImageRefused("empty image reference")
        local = self.local_path(text)
        if local is not None:
            return self.local.read(local, self.max_bytes)
        url = text if not text.startswith(("/data/", "data/")) else f"{label_studio.url}/{text.lstrip('/')}"
        return self._get(url, label_studio, deadline, handle)

    def _request_headers(self, url: str, label_studio: LabelStudioOrigin) -> dict[str, str]:
        """Headers for one hop, after the path rule; the token only to the project's Label Studio."""
        scheme, host, port = origin_of(url)
        if scheme not in ("http", "https") or not host:
            raise ImageRefused(f"not an http(s) image URL: {describe(url)}")
        headers = {"Accept-Encoding": "identity", "User-Agent": "defect-assist"}
        if (scheme, host, port) in self._label_studio:
            if not label_studio_path_ok(urlsplit(url).path):
                raise ImageRefused(f"only /data/ paths of Label Studio are fetched, not {describe(url)}")
            if label_studio.token and origin_of(label_studio.url) == (scheme, host, port):
                headers["Authorization"] = f"Token {label_studio.token}"
        return headers

    def _get(self, url: str, label_studio: LabelStudioOrigin, deadline: float, handle: Fetch) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            headers = self._request_headers(url, label_studio)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or handle.aborted:
                raise ImageFetchError(f"{describe(url)}: fetch deadline passed")
            timeouts = {"connect": remaining, "read": remaining, "write": remaining, "pool": remaining}
            try:
                with self.pool.stream(
                    "GET", url, headers=headers, extensions={"timeout": timeouts}
                ) as response:
                    handle.attach(response)
                    status = response.status
                    location = dict((k.lower(), v) for k, v in response.headers).get(b"location")
                    if status in (301, 302, 303, 307, 308) and location:
                        url = urljoin(url, location.decode("latin-1"))
                        continue
                    if status >= 400:
                        raise ImageFetchError(f"{describe(url)}: HTTP {status}", status=status)
                    return self._body(response, url, deadline)
            except (ImageRefused, ImageFetchError):
                raise
            except (TimeoutError, httpcore.TimeoutException) as error:
                raise ImageFetchError(f"{describe(url)}: timed out ({error})") from error
            except (httpcore.ProtocolError, httpcore.NetworkError, httpcore.UnsupportedProtocol) as error:
                if handle.aborted:
                    raise ImageFetchError(f"{describe(url)}: fetch deadline passed") from error
                raise ImageFetchError(f"{describe(url)}: {type(error).__name__}: {error}") from error
            except (ValueError, httpcore.LocalProtocolError) as error:
                raise ImageRefused(f"not a valid image URL: {describe(url)} ({error})") from error
        raise ImageFetchError(f"{describe(url)}: more than {MAX_REDIRECTS} redirects")

    def _body(self, response: httpcore.Response, url: str, deadline: float) -> bytes:
        length = dict((k.lower(), v) for k, v in response.headers).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            raise ImageFetchError(f"{describe(url)}: {int(length)} bytes, more than MAX_IMAGE_BYTES")
        data = bytearray()
        for chunk in response.iter_stream():
            data += chunk
            if len(data) > self.max_bytes:
                raise ImageFetchError(f"{describe(url)}: more than MAX_IMAGE_BYTES={self.max_bytes}")
            if time.monotonic() > deadline:
                raise ImageFetchError(f"{describe(url)}: fetch deadline passed")
        return bytes(data)

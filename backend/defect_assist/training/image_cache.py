"""Content-addressed cache of task images, so a retrain downloads each image once."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from defect_assist.label_studio.image_sources import Fetch, ImageSources, LabelStudioOrigin

if TYPE_CHECKING:
    from defect_assist.label_studio.client import LabelStudioClient


class ImageCache:
    """Content-addressed image files: ``root/<aa>/<sha256><ext>``, plus a URL → digest index."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _url_entry(self, url: str) -> Path:
        return self.root / "urls" / hashlib.sha256(url.encode()).hexdigest()

    def lookup(self, url: str) -> Path | None:
        entry = self._url_entry(url)
        if entry.exists():
            path = self.root / entry.read_text().strip()
            if path.exists():
                return path
        return None

    def put(self, data: bytes, url: str = "") -> Path:
        digest = hashlib.sha256(data).hexdigest()
        suffix = Path(url.split("?d=")[-1].split("?")[0]).suffix.lower() if url else ""
        relative = Path(digest[:2]) / f"{digest}{suffix if len(suffix) <= 5 else ''}"
        path = self.root / relative
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.{os.getpid()}")
            temporary.write_bytes(data)
            os.replace(temporary, path)
        if url:
            entry = self._url_entry(url)
            entry.parent.mkdir(parents=True, exist_ok=True)
            temporary = entry.with_name(f".{entry.name}.{os.getpid()}")
            temporary.write_text(str(relative))
            os.replace(temporary, entry)
        return path

    def fetch(
        self, url: str, client: LabelStudioClient, sources: ImageSources, timeout: float = 15.0
    ) -> tuple[Path, bool]:
        """``(path, downloaded)``: the cached file for ``url``, read through ``sources`` (the source rule,
        the byte limit, a ``timeout`` deadline) only the first time; ImageRefused / ImageFetchError."""
        cached = self.lookup(url)
        if cached is not None:
            return cached, False
        origin = LabelStudioOrigin(client.url, client.token)
        data = sources.fetch(url, origin, time.monotonic() + timeout, Fetch())
        return self.put(data, url), True


def digest_of(path: Path) -> str:
    """sha256 of a cached image (its file name) or of any file's bytes."""
    stem = path.stem
    if len(stem) == 64 and all(c in "0123456789abcdef" for c in stem):
        return stem
    return hashlib.sha256(path.read_bytes()).hexdigest()

"""A project's training images kept with its versions, so a later retrain can train on them again.

``MODEL_DIR/<project>/_images/<aa>/<sha256><ext>``: content-addressed, one file per image however
many versions use it, next to the versions in the store that the worker and the backend share.
Images are hard-linked when the file system allows it, else copied (``os.replace`` of a temporary
name: a reader never sees half a file). A hard link shares the source file's bytes, so every image
read back is checked against its digest; one that changed since reads as missing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes (read in chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ImageArchive:
    """Content-addressed training images under ``root``; ``fallbacks`` are read-only roots of the same
    layout (the retrain image cache, ``CACHE_DIR/images``) searched for images kept before."""

    def __init__(self, root: str | Path, fallbacks: Iterable[str | Path] = ()) -> None:
        self.root = Path(root)
        self.fallbacks = [Path(f) for f in fallbacks]

    def _stored(self, root: Path, digest: str) -> Path | None:
        folder = root / digest[:2]
        if not folder.is_dir():
            return None
        return next((p for p in sorted(folder.glob(f"{digest}*")) if p.stem == digest), None)

    def find(self, digest: str) -> Path | None:
        """The kept image of ``digest`` whose bytes still match it, or ``None``."""
        for root in (self.root, *self.fallbacks):
            path = self._stored(root, digest)
            if path is not None and sha256_file(path) == digest:
                return path
        return None

    def not_kept(self, digests: Iterable[str]) -> list[str]:
        """The digests with no file here (not checked against their bytes: cheap)."""
        return [d for d in digests if self._stored(self.root, d) is None]

    def keep(self, images: Mapping[str, Path]) -> int:
        """Keep ``digest → image`` (link or copy) unless already kept; the number newly kept."""
        added = 0
        for digest, source in images.items():
            if self._stored(self.root, digest) is not None:
                continue
            suffix = source.suffix.lower() if len(source.suffix) <= 5 else ""
            target = self.root / digest[:2] / f"{digest}{suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
            try:
                os.link(source, temporary)
            except OSError:  # another file system, no permission, no hard links: copy
                try:
                    shutil.copyfile(source, temporary)
                except OSError:  # disk full: no half-copied file is left
                    temporary.unlink(missing_ok=True)
                    raise
            os.replace(temporary, target)
            added += 1
        return added

    def resolve(self, digests: Iterable[str], known: Mapping[str, Path]) -> dict[str, Path]:
        """``digest → image`` for each digest found: this call's images first, then the kept ones."""
        found: dict[str, Path] = {}
        for digest in digests:
            path = known.get(digest) or self.find(digest)
            if path is not None:
                found[digest] = path
        return found

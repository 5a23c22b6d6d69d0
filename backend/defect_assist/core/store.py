"""Versioned model store: ``MODEL_DIR/<project>/<version>/`` with an atomically updated ``current`` pointer.

Publishing writes the model into a hidden temporary directory, fsyncs it, renames it to its version
name (atomic on one filesystem) and only then replaces the ``CURRENT`` file (write temp + ``os.replace``).
A crash at any point leaves either the old current version or the new one, never a half-written model;
leftover temporary directories are ignored by readers and swept by the next publish.

A version published without being made current is a **candidate**: its directory holds
``candidate.json`` (why it was not made current), written before the rename so it appears with the
version. :meth:`ModelStore.promote` makes a candidate current (``candidate.json`` becomes
``promoted.json``). Every version is ``current``, ``candidate`` or ``previous`` (was current, or
was published before the store knew candidates). ``<project>/_images/`` keeps the versions'
training images (see ``defect_assist.training.image_archive``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from defect_assist.core.models.base import AnomalyModel
from defect_assist.core.models.metadata import METADATA_FILE, WEIGHTS_FILE
from defect_assist.core.models.registry import load_model

CURRENT_FILE = "CURRENT"
CANDIDATE_FILE = "candidate.json"
PROMOTED_FILE = "promoted.json"
IMAGES_DIR = "_images"
VERSION_PATTERN = re.compile(r"^v(\d{4,})-([a-z0-9_]+)$")
_PROJECT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class StoreError(RuntimeError):
    """The store was asked for something it does not hold."""


class PublishError(StoreError):
    """Publishing failed on the filesystem (disk full, quota, read-only); the current version is unchanged
    and no partial version is left."""

    def __init__(self, project: str, step: str, error: OSError) -> None:
        reason = error.strerror or str(error)
        super().__init__(
            f"project {project}: publishing failed while {step}: {reason}; the current version is unchanged"
        )
        self.errno = error.errno


class VersionConflict(StoreError):
    """The version exists but cannot do what was asked (promote a non-candidate, roll back to a candidate)."""


@dataclass(frozen=True)
class VersionInfo:
    """One published model version."""

    project: str
    version: str
    path: Path
    metadata: dict[str, Any]
    is_current: bool = False
    candidate: dict[str, Any] | None = None  # candidate.json of a version never made current

    @property
    def status(self) -> str:
        """``current``, ``candidate`` (published, never made current) or ``previous``."""
        if self.is_current:
            return "current"
        return "candidate" if self.candidate is not None else "previous"

    @property
    def candidate_reason(self) -> str | None:
        return None if self.candidate is None else str(self.candidate.get("reason", ""))

    def summary(self) -> dict[str, Any]:
        """What ``versions``, ``promote`` and the HTTP routes report about a version."""
        return {
            "project": self.project,
            "version": self.version,
            "status": self.status,
            "current": self.is_current,
            "candidate_reason": self.candidate_reason,
            "n_train_images": self.metadata.get("n_train_images"),
            "created": self.metadata.get("created"),
        }

    @property
    def number(self) -> int:
        match = VERSION_PATTERN.match(self.version)
        return int(match.group(1)) if match else -1

    @property
    def kind(self) -> str:
        return str(self.metadata.get("kind", ""))


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelStore:
    """Read and publish model versions under one root directory (``MODEL_DIR``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def project_dir(self, project: str) -> Path:
        project = str(project)
        if not _PROJECT_PATTERN.match(project):
            raise StoreError(f"invalid project id {project!r}")
        return self.root / project

    @contextmanager
    def _lock(self, project: str) -> Iterator[None]:
        directory = self.project_dir(project)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ reading
    def projects(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _PROJECT_PATTERN.match(p.name))

    def versions(self, project: str) -> list[VersionInfo]:
        """Complete versions of ``project``, oldest first."""
        directory = self.project_dir(project)
        if not directory.exists():
            return []
        current = self.current_version(project)
        found = []
        for path in directory.iterdir():
            if not (path.is_dir() and VERSION_PATTERN.match(path.name)):
                continue
            meta_file = path / METADATA_FILE
            if not (meta_file.exists() and (path / WEIGHTS_FILE).exists()):
                continue
            found.append(self._info(project, path, path.name == current))
        return sorted(found, key=lambda v: v.number)

    @staticmethod
    def _info(project: str, path: Path, is_current: bool) -> VersionInfo:
        metadata = json.loads((path / METADATA_FILE).read_text())
        marker = path / CANDIDATE_FILE
        try:
            candidate = json.loads(marker.read_text())
        except FileNotFoundError:
            candidate = None
        return VersionInfo(str(project), path.name, path, metadata, is_current, candidate)

    def version(self, project: str, version: str) -> VersionInfo:
        """One version of ``project`` (any status)."""
        path = self.project_dir(project) / version
        if not (VERSION_PATTERN.match(version) and (path / METADATA_FILE).exists()):
            raise StoreError(f"project {project} has no version {version}")
        return self._info(project, path, self.current_version(project) == version)

    def candidates(self, project: str) -> list[VersionInfo]:
        """Versions published but never made current, oldest first."""
        return [v for v in self.versions(project) if v.status == "candidate"]

    def images_dir(self, project: str) -> Path:
        """Where the project's training images are kept, content-addressed (shared like the versions)."""
        return self.project_dir(project) / IMAGES_DIR

    def current_version(self, project: str) -> str | None:
        """Name of the current version, or None before the first publish."""
        pointer = self.project_dir(project) / CURRENT_FILE
        try:
            name = pointer.read_text().strip()
        except FileNotFoundError:
            return None
        return name if name and (pointer.parent / name / METADATA_FILE).exists() else None

    def current(self, project: str) -> VersionInfo | None:
        name = self.current_version(project)
        if name is None:
            return None
        return self._info(project, self.project_dir(project) / name, True)

    def load(self, project: str, version: str | None = None, device: str = "auto") -> AnomalyModel:
        """Load ``version`` (default: current) of ``project``."""
        name = version or self.current_version(project)
        if name is None:
            raise StoreError(f"project {project} has no trained model yet")
        path = self.project_dir(project) / name
        if not (path / METADATA_FILE).exists():
            raise StoreError(f"project {project} has no version {name}")
        return load_model(path, device=device)

    # ------------------------------------------------------------------ writing
    def publish(
        self,
        project: str,
        model: AnomalyModel,
        make_current: bool = True,
        candidate_reason: str | None = None,
    ) -> VersionInfo:
        """Save ``model`` as the next version of ``project``; atomically make it current, or else keep it
        as a candidate with ``candidate_reason``."""
        with self._lock(project):
            directory = self.project_dir(project)
            self._sweep_temporaries(directory)
            temporary = directory / f".tmp-{uuid.uuid4().hex}"
            try:
                model.save(temporary)
                if not make_current:
                    reason = candidate_reason or "published without being made current"
                    marker = {"reason": reason, "created": _now()}
                    (temporary / CANDIDATE_FILE).write_text(json.dumps(marker, indent=2))
                _fsync_tree(temporary)
            except Exception as error:  # nothing was published: no half-written model is left
                full = _nearly_full(directory)  # before the cleanup frees the space again
                shutil.rmtree(temporary, ignore_errors=True)
                if isinstance(error, OSError):  # disk full, quota, read-only
                    raise PublishError(project, "writing the model", error) from error
                if full:  # torch.save reports a full disk as a RuntimeError of its zip writer
                    no_space = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    raise PublishError(project, "writing the model", no_space) from error
                raise
            numbers = [v.number for v in self.versions(project)]
            existing = [int(m.group(1)) for p in directory.iterdir() if (m := VERSION_PATTERN.match(p.name))]
            number = max(numbers + existing + [0]) + 1
            name = f"v{number:04d}-{model.kind}"
            final = directory / name
            os.rename(temporary, final)
            _fsync_dir(directory)
            if make_current:
                try:
                    self._write_pointer(directory, name)
                except OSError as error:  # the version exists, complete, but the old one still serves
                    self._mark_candidate(final, f"published but not made current: {error}")
                    raise PublishError(project, f"making {name} current", error) from error
        return self._info(project, final, self.current_version(project) == name)

    @staticmethod
    def _mark_candidate(version_dir: Path, reason: str) -> None:
        """Best effort (the disk may still be full): a version that never became current reads as a
        candidate, which ``promote`` can make current once there is room."""
        with suppress(OSError):
            (version_dir / CANDIDATE_FILE).write_text(json.dumps({"reason": reason, "created": _now()}))

    def set_current(self, project: str, version: str, note: str = "set current") -> VersionInfo:
        """Point ``current`` at an existing version (rollback, roll forward or promote a candidate)."""
        with self._lock(project):
            directory = self.project_dir(project)
            if not (VERSION_PATTERN.match(version) and (directory / version / METADATA_FILE).exists()):
                raise StoreError(f"project {project} has no version {version}")
            self._write_pointer(directory, version)
            marker = directory / version / CANDIDATE_FILE
            if marker.exists():  # no longer a candidate: keep why it was one, and when it was promoted
                promoted = json.loads(marker.read_text()) | {"promoted": _now(), "note": note}
                temporary = directory / version / f".{PROMOTED_FILE}.{uuid.uuid4().hex}"
                temporary.write_text(json.dumps(promoted, indent=2))
                os.replace(temporary, directory / version / PROMOTED_FILE)
                marker.unlink()
                _fsync_dir(directory / version)
        info = self.current(project)
        assert info is not None
        return info

    def promote(self, project: str, version: str) -> VersionInfo:
        """Make the candidate ``version`` current (``rollback`` is for earlier versions)."""
        info = self.version(project, version)
        if info.status != "candidate":
            raise VersionConflict(f"project {project}: {version} is {info.status}, not a candidate")
        return self.set_current(project, version, note="promoted")

    def rollback(self, project: str, version: str | None = None) -> VersionInfo:
        """Make ``version`` current, or by default the last non-candidate version before the current one."""
        if version is None:
            found = self.versions(project)
            names = [v.version for v in found]
            current = self.current_version(project)
            before = found[: names.index(current)] if current in names else []
            earlier = [v.version for v in before if v.status != "candidate"]
            if not earlier:
                raise VersionConflict(f"project {project} has no earlier version to roll back to")
            version = earlier[-1]
        elif self.version(project, version).status == "candidate":
            raise VersionConflict(f"project {project}: {version} is a candidate: promote it instead")
        return self.set_current(project, version, note="rollback")

    @staticmethod
    def _write_pointer(directory: Path, name: str) -> None:
        temporary = directory / f".{CURRENT_FILE}.{uuid.uuid4().hex}"
        try:
            with open(temporary, "w") as handle:
                handle.write(name + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, directory / CURRENT_FILE)
        except OSError:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_dir(directory)

    @staticmethod
    def _sweep_temporaries(directory: Path) -> None:
        for path in directory.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def _nearly_full(path: Path, margin: int = 1 << 20) -> bool:
    """Less than ``margin`` bytes free for this user on ``path``'s file system."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < margin


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

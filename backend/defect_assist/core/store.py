"""Versioned model store: ``MODEL_DIR/<project>/<version>/`` with an atomically updated ``current`` pointer.

Publishing writes the model into a hidden temporary directory, fsyncs it, renames it to its version
name (atomic on one filesystem) and only then replaces the ``CURRENT`` file (write temp + ``os.replace``).
A crash at any point leaves either the old current version or the new one, never a half-written model;
leftover temporary directories are ignored by readers and swept by the next publish.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defect_assist.core.models.base import AnomalyModel
from defect_assist.core.models.metadata import METADATA_FILE, WEIGHTS_FILE
from defect_assist.core.models.registry import load_model

CURRENT_FILE = "CURRENT"
VERSION_PATTERN = re.compile(r"^v(\d{4,})-([a-z0-9_]+)$")
_PROJECT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class StoreError(RuntimeError):
    """The store was asked for something it does not hold."""


@dataclass(frozen=True)
class VersionInfo:
    """One published model version."""

    project: str
    version: str
    path: Path
    metadata: dict[str, Any]
    is_current: bool = False

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
            metadata = json.loads(meta_file.read_text())
            found.append(VersionInfo(str(project), path.name, path, metadata, path.name == current))
        return sorted(found, key=lambda v: v.number)

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
        path = self.project_dir(project) / name
        return VersionInfo(str(project), name, path, json.loads((path / METADATA_FILE).read_text()), True)

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
    def publish(self, project: str, model: AnomalyModel, make_current: bool = True) -> VersionInfo:
        """Save ``model`` as the next version of ``project``; atomically make it current."""
        with self._lock(project):
            directory = self.project_dir(project)
            self._sweep_temporaries(directory)
            temporary = directory / f".tmp-{uuid.uuid4().hex}"
            model.save(temporary)
            _fsync_tree(temporary)
            numbers = [v.number for v in self.versions(project)]
            existing = [int(m.group(1)) for p in directory.iterdir() if (m := VERSION_PATTERN.match(p.name))]
            number = max(numbers + existing + [0]) + 1
            name = f"v{number:04d}-{model.kind}"
            final = directory / name
            os.rename(temporary, final)
            _fsync_dir(directory)
            if make_current:
                self._write_pointer(directory, name)
        info = self.current(project) if make_current else None
        if info is None or info.version != name:
            metadata = json.loads((final / METADATA_FILE).read_text())
            info = VersionInfo(str(project), name, final, metadata, False)
        return info

    def set_current(self, project: str, version: str) -> VersionInfo:
        """Point ``current`` at an existing version (rollback or roll forward)."""
        with self._lock(project):
            directory = self.project_dir(project)
            if not (directory / version / METADATA_FILE).exists():
                raise StoreError(f"project {project} has no version {version}")
            self._write_pointer(directory, version)
        info = self.current(project)
        assert info is not None
        return info

    def rollback(self, project: str, version: str | None = None) -> VersionInfo:
        """Make ``version`` current, or by default the version published before the current one."""
        if version is None:
            names = [v.version for v in self.versions(project)]
            current = self.current_version(project)
            if current not in names or names.index(current) == 0:
                raise StoreError(f"project {project} has no earlier version to roll back to")
            version = names[names.index(current) - 1]
        return self.set_current(project, version)

    @staticmethod
    def _write_pointer(directory: Path, name: str) -> None:
        temporary = directory / f".{CURRENT_FILE}.{uuid.uuid4().hex}"
        with open(temporary, "w") as handle:
            handle.write(name + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, directory / CURRENT_FILE)
        _fsync_dir(directory)

    @staticmethod
    def _sweep_temporaries(directory: Path) -> None:
        for path in directory.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)

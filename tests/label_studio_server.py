"""Pytest fixtures: a real Label Studio server (own cached venv), a project of magnetic-tile images.

``label_studio`` (session): installs ``label-studio`` into ``.ls-venv`` if missing (kept apart from the
project venv), starts it on 127.0.0.1 on a free port with a fresh temporary data dir (a copy of a
cached, migrated, empty template: admin user and token only), and yields a :class:`LabelStudioServer`.
``label_studio_project`` (module): a project with the recommended config
whose tasks are imported from ``../shared/datasets/magnetic_tile/test`` through local-files storage.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from defect_assist_tools.local_label_studio import (
    CONFIG,
    DATASETS,
    PASSWORD,
    USER,
    LabelStudioServer,
    ensure_label_studio,
    free_port,
    start_label_studio,
    stop_label_studio,
    template_data_dir,
)

__all__ = ["PASSWORD", "USER", "LabelStudioServer", "free_port"]


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """A Label Studio on a free port with a fresh data dir (a copy of the cached empty template)."""
    executable = ensure_label_studio()
    template = template_data_dir(executable)
    home = tmp_path_factory.mktemp("label-studio")
    shutil.copytree(template, home / "ls-data")
    server = start_label_studio(executable, home, home / "ls-data", free_port(), home / "label-studio.log")
    try:
        yield server
    finally:
        stop_label_studio(server)


def project_images() -> dict[str, list[Path]]:
    """Three held-out normals and three large defects of magnetic_tile/test."""
    test = DATASETS / "magnetic_tile" / "test"
    normal = sorted((test / "good").glob("*.jpg"))[::15][:3]
    defects = [sorted((test / kind).glob("*.jpg"))[::9][0] for kind in ("break", "fray", "uneven")]
    return {"normal": normal, "anomalous": defects}


@dataclass
class LabelStudioProject:
    server: LabelStudioServer
    id: int
    images: dict[str, list[Path]]
    label_config: str

    def kind_of(self, task: dict[str, Any]) -> str:
        url = str(next(iter(task["data"].values())))
        return next(kind for kind, paths in self.images.items() if any(url.endswith(p.name) for p in paths))


@pytest.fixture(scope="module")
def label_studio_project(label_studio: LabelStudioServer) -> LabelStudioProject:
    """A project with the recommended labeling config and six magnetic-tile images (local files)."""
    images = project_images()
    names = sorted(p.name for paths in images.values() for p in paths)
    config = CONFIG.read_text()
    project = label_studio.create_project(f"defect-assist e2e {time.time():.0f}", config)
    regex = "^(" + "|".join(name.replace(".", r"\.") for name in names) + ")$"
    label_studio.import_local_files(project, DATASETS / "magnetic_tile" / "test", regex)
    tasks = label_studio.tasks(project)
    if len(tasks) != len(names):
        raise RuntimeError(
            f"expected {len(names)} tasks, storage sync made {len(tasks)}:\n{label_studio.log_tail()}"
        )
    return LabelStudioProject(label_studio, project, images, config)

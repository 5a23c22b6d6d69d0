"""The retrain reads task images under the serving source rule (docs/reliability.md).

A real ``LabelStudioClient`` and ``ImageSources`` against local HTTP servers: Label Studio's
``/data/`` paths come with its token, files under the local roots are read, server files outside
them and non-public hosts are left out with their reason (never read, never contacted), and Label
Studio failing to give an image is the transient error the worker retries.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from serving_fakes import FakeServer, send

from defect_assist.core.settings import Settings
from defect_assist.label_studio.client import LabelStudioClient, LabelStudioUnavailable
from defect_assist.label_studio.image_sources import ImageSources
from defect_assist.training.label_studio_data import _cache_images
from defect_assist.training.progress import TrainingProgress

pytestmark = pytest.mark.unit

NORMAL = [{"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": ["normal"]}}]


def _task(task_id: int, image: str) -> dict:
    return {"id": task_id, "data": {"image": image}, "annotations": [{"id": task_id, "result": NORMAL}]}


def _collect(tasks: list[dict], settings: Settings):
    sources = ImageSources.from_settings(settings, settings.max_image_bytes)
    try:
        with LabelStudioClient.from_settings(settings) as client:
            return _cache_images(tasks, settings.cache_dir, client, sources, TrainingProgress(), 5.0)
    finally:
        sources.close()


def test_retrain_images_follow_the_source_rule(
    tmp_path: Path, train_normals: list[Path], magnetic_tile
) -> None:
    good = train_normals[0].read_bytes()
    ls = FakeServer(
        {
            "/data/upload/1/good.jpg": lambda h: send(h, good),
            "/data/upload/1/down.jpg": lambda h: send(h, b"", 503),
        }
    ).start()
    private = FakeServer({"/secret.jpg": lambda h: send(h, good)}).start()
    outside = tmp_path / "outside.jpg"
    shutil.copy(train_normals[1], outside)
    settings = Settings(
        label_studio_url=ls.url,
        label_studio_api_key="ls-token",
        cache_dir=tmp_path / "cache",
        datasets_dir=magnetic_tile.parent,
    )
    try:
        found = _collect(
            [
                _task(1, "/data/upload/1/good.jpg"),
                _task(2, str(train_normals[2])),  # under DATASETS_DIR: a local root
                _task(3, "/etc/passwd"),
                _task(4, str(outside)),
                _task(5, f"{private.url}/secret.jpg"),
                _task(6, "/data/../api/projects/"),
            ],
            settings,
        )
        assert [p.read_bytes() for p in found.normals] == [good, train_normals[2].read_bytes()]
        left_out = ["/etc/passwd", str(outside), f"{private.url}/secret.jpg", "/data/../api/projects/"]
        assert len(found.skipped) == len(left_out)
        assert all(r.startswith(f"{ref}: ") for r, ref in zip(found.skipped, left_out, strict=True)), (
            found.skipped
        )
        assert private.requests == []  # a non-public host is never contacted
        assert ls.requests == [("/data/upload/1/good.jpg", "Token ls-token")]  # never its API
        with pytest.raises(LabelStudioUnavailable, match=r"down\.jpg"):
            _collect([_task(7, "/data/upload/1/down.jpg")], settings)
    finally:
        ls.stop()
        private.stop()

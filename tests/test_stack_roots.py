"""The embedded stack gives its backend the image roots it serves from (docs/reliability.md).

The backend reads task images only under its local roots; the stack's smoke check sends the absolute
paths of ``--data`` samples, so the backend's environment must name that folder even when it is
outside ``DATASETS_DIR`` (``--no-label-studio``) — and still refuse everything else.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from defect_assist.core.settings import Settings
from defect_assist.label_studio.image_sources import ImageRefused, ImageSources
from defect_assist.serving.limits import ServingLimits
from defect_assist_tools.stack import StackOptions, child_env

pytestmark = pytest.mark.unit


def _backend_sources(env: dict[str, str], datasets: Path):  # type: ignore[no-untyped-def]
    settings = Settings(
        image_local_roots=env["IMAGE_LOCAL_ROOTS"],
        local_files_document_root=env.get("LOCAL_FILES_DOCUMENT_ROOT", ""),
        datasets_dir=datasets,
    )
    return ImageSources.from_settings(settings, ServingLimits().max_image_bytes)


@pytest.mark.parametrize("with_label_studio", [False, True], ids=["no-label-studio", "label-studio"])
def test_backend_reads_the_stack_data_folder_and_nothing_else(
    tmp_path: Path, with_label_studio: bool
) -> None:
    data = tmp_path / "mine" / "tiles"
    sample = data / "test" / "good" / "000.png"
    sample.parent.mkdir(parents=True)
    sample.write_bytes(b"png")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"png")
    (tmp_path / "datasets").mkdir()
    label_studio = SimpleNamespace(url="http://127.0.0.1:8080", token="t") if with_label_studio else None
    user_root = tmp_path / "extra"
    user_root.mkdir()
    settings = Settings(image_local_roots=str(user_root))

    env = child_env(settings, StackOptions(data=data), "redis://127.0.0.1:6379/0", label_studio)

    assert env["IMAGE_LOCAL_ROOTS"].split(os.pathsep) == [str(user_root), str(data.resolve())]
    sources = _backend_sources(env, tmp_path / "datasets")
    assert sources.local_path(str(sample.resolve())) == sample.resolve()
    with pytest.raises(ImageRefused):
        sources.local_path(str(outside))
    with pytest.raises(ImageRefused):
        sources.local_path("/etc/passwd")
    if with_label_studio:
        assert env["LOCAL_FILES_DOCUMENT_ROOT"] == str(data.resolve().parent)
        assert env["LABEL_STUDIO_URL"] == "http://127.0.0.1:8080"
        local_file = "/data/local-files/?d=tiles/test/good/000.png"
        assert sources.local_path(local_file) == sample.resolve()

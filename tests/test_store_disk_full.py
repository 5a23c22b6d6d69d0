"""Disk full while publishing: the current version keeps serving, no partial version, a clear error.

The model store sits on a real, small tmpfs filled to the last byte (needs root to mount, as in CI;
skipped elsewhere). The step that cannot be filled on purpose in between (the ``CURRENT`` pointer,
after the version directory is renamed) gets an injected ``ENOSPC``.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from defect_assist.core.settings import Settings
from defect_assist.core.store import ModelStore, PublishError
from defect_assist.training.pipeline import train_and_publish

pytestmark = pytest.mark.integration


def _directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture
def small_disk(tmp_path: Path, small_patchcore) -> Iterator[Path]:
    """A tmpfs with room for about two saved models (mounted on ``tmp_path/disk``)."""
    saved = tmp_path / "saved"
    small_patchcore.save(saved)
    size = 2 * _directory_bytes(saved) + (4 << 20)
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    """Write until the file system refuses (1 MiB, then 4 KiB writes): ENOSPC for the next write."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for chunk in (1 << 20, 4096):
            try:
                while True:
                    handle.write(b"\0" * chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC
    return filler


def test_disk_full_while_writing_the_model(small_disk: Path, small_patchcore) -> None:
    store = ModelStore(small_disk / "models")
    first = store.publish("7", small_patchcore).version
    filler = _fill(small_disk)
    with pytest.raises(PublishError) as raised:
        store.publish("7", small_patchcore)
    assert raised.value.errno == errno.ENOSPC
    assert "No space left on device" in str(raised.value) and "current version is unchanged" in str(
        raised.value
    )
    assert store.current_version("7") == first
    assert [v.version for v in store.versions("7")] == [first]
    assert not list((small_disk / "models" / "7").glob(".tmp-*"))  # the half-written model is gone
    assert store.load("7").metadata.created == small_patchcore.metadata.created  # still serves
    filler.unlink()  # room again: the next publish works and takes the next number
    assert store.publish("7", small_patchcore).version == "v0002-patchcore"


def test_disk_full_while_making_it_current_keeps_a_complete_candidate(
    tmp_path: Path, small_patchcore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path / "models")
    first = store.publish("8", small_patchcore).version

    def no_space(directory: Path, name: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ModelStore, "_write_pointer", staticmethod(no_space))
    with pytest.raises(PublishError, match="making v0002-patchcore current"):
        store.publish("8", small_patchcore)
    monkeypatch.undo()
    assert store.current_version("8") == first
    second = store.version("8", "v0002-patchcore")
    assert second.status == "candidate" and "not made current" in (second.candidate_reason or "")
    assert store.promote("8", second.version).version == second.version  # once there is room


def test_retrain_on_a_full_disk_fails_with_the_reason(
    small_disk: Path, small_patchcore, train_normals: list[Path]
) -> None:
    """The retrain path (the worker's job body) on a full model disk: a PublishError naming the disk, the
    current version untouched; the job fails at once with that reason (not a transient error)."""
    settings = Settings(model_dir=small_disk / "models", cache_dir=small_disk / "cache", device="cpu")
    store = ModelStore(settings.model_dir)
    first = store.publish("9", small_patchcore).version
    _fill(small_disk)
    with pytest.raises(PublishError, match="No space left on device"):
        train_and_publish(
            "9",
            train_normals[:14],
            settings=settings,
            kind="patchcore",
            options={"image_size": 128},
            device="cpu",
            keep_previous=False,
        )
    assert store.current_version("9") == first
    assert [v.version for v in store.versions("9")] == [first]
    leftovers = [
        p for p in (small_disk / "models" / "9").rglob(".*") if p.name.startswith((".tmp-", ".CURRENT"))
    ]
    assert leftovers == []
    shutil.rmtree(small_disk / "cache", ignore_errors=True)

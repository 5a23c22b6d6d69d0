"""Versioned model store: atomic publish, current pointer, list, rollback, crash safety."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from defect_assist.core.models.metadata import METADATA_FILE
from defect_assist.core.store import CURRENT_FILE, ModelStore, StoreError

pytestmark = pytest.mark.unit


def test_publish_list_load_and_rollback(tmp_path: Path, small_patchcore) -> None:
    store = ModelStore(tmp_path)
    assert store.current(project="7") is None
    first = store.publish("7", small_patchcore)
    second = store.publish("7", small_patchcore)
    assert (first.version, second.version) == ("v0001-patchcore", "v0002-patchcore")
    assert store.current_version("7") == "v0002-patchcore"
    assert [v.version for v in store.versions("7")] == ["v0001-patchcore", "v0002-patchcore"]
    assert [v.is_current for v in store.versions("7")] == [False, True]
    loaded = store.load("7")
    assert loaded.metadata.training_fingerprint == small_patchcore.metadata.training_fingerprint
    assert store.rollback("7").version == "v0001-patchcore"
    assert store.current_version("7") == "v0001-patchcore"
    assert store.set_current("7", "v0002-patchcore").is_current
    with pytest.raises(StoreError):
        store.set_current("7", "v0099-patchcore")
    assert store.projects() == ["7"]


def test_unknown_project_and_bad_ids(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(StoreError, match="no trained model"):
        store.load("12")
    with pytest.raises(StoreError, match="invalid project"):
        store.project_dir("../escape")


def test_metadata_records_what_was_trained(tmp_path: Path, small_patchcore) -> None:
    info = ModelStore(tmp_path).publish("p", small_patchcore)
    meta = json.loads((info.path / METADATA_FILE).read_text())
    for key in ("kind", "backbone", "image_size", "calibration", "training_fingerprint", "created", "config"):
        assert meta[key], key
    assert meta["calibration"]["image_threshold"] > 0
    assert meta["n_train_images"] == 24


def _publish_slowly(root: str, model_dir: str) -> None:
    """Child process: publish while the save is artificially slow, to be killed mid-write."""
    from defect_assist.core.models.registry import load_model

    model = load_model(model_dir, device="cpu")
    original_save = model.save

    def slow_save(directory):
        original_save(directory)
        Path(directory, "marker").write_text("written")
        time.sleep(30)  # killed here: files exist in the temp dir, nothing renamed yet

    model.save = slow_save
    ModelStore(root).publish("crash", model)


def test_kill_during_publish_never_exposes_partial_version(tmp_path: Path, small_patchcore) -> None:
    store = ModelStore(tmp_path / "store")
    good = store.publish("crash", small_patchcore)
    saved = tmp_path / "saved"
    small_patchcore.save(saved)
    child = multiprocessing.get_context("spawn").Process(
        target=_publish_slowly, args=(str(store.root), str(saved))
    )
    child.start()
    deadline = time.time() + 60
    while time.time() < deadline and not list((store.root / "crash").glob(".tmp-*/marker")):
        time.sleep(0.2)
    assert list((store.root / "crash").glob(".tmp-*/marker")), "child never reached the write"
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert store.current_version("crash") == good.version
    assert [v.version for v in store.versions("crash")] == [good.version]
    assert store.load("crash").metadata.created == small_patchcore.metadata.created
    # the next publish sweeps the leftover temp dir and takes the next number
    assert store.publish("crash", small_patchcore).version == "v0002-patchcore"
    assert not list((store.root / "crash").glob(".tmp-*"))


def test_pointer_to_missing_version_reads_as_none(tmp_path: Path) -> None:
    project = tmp_path / "x"
    project.mkdir()
    (project / CURRENT_FILE).write_text("v0005-patchcore\n")
    assert ModelStore(tmp_path).current_version("x") is None

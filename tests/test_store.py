"""Versioned model store: atomic publish, current pointer, list, rollback, crash safety."""

from __future__ import annotations

import json
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


def test_pointer_to_missing_version_reads_as_none(tmp_path: Path) -> None:
    project = tmp_path / "x"
    project.mkdir()
    (project / CURRENT_FILE).write_text("v0005-patchcore\n")
    assert ModelStore(tmp_path).current_version("x") is None

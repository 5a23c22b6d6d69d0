"""The store under a crash: a process killed in the middle of a publish never exposes a partial version."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from defect_assist.core.store import ModelStore

pytestmark = pytest.mark.integration  # a real child process, killed with SIGKILL


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

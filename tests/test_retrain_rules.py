"""Retrains never forget, the rules alone: the training set (previous ∪ new − defective), the minimum,
the check that decides current vs candidate, the kept training images, candidates in the store and
the promote / rollback commands and routes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.unit


def _digests(prefix: str, n: int) -> list[str]:
    return [hashlib.sha256(f"{prefix}{i}".encode()).hexdigest() for i in range(n)]


def test_training_set_is_previous_plus_new_minus_defective():
    from defect_assist.training.training_set import (
        CHECK_MIN_POOL,
        Previous,
        is_check_digest,
        plan_training_set,
    )

    folder = _digests("folder", 650)
    first = plan_training_set(Previous(), folder, [])
    assert set(first.training) | set(first.check) == set(folder) and not set(first.training) & set(
        first.check
    )
    assert set(first.check) == {d for d in folder if is_check_digest(d)}
    assert 40 <= len(first.check) <= 90  # ~10 %, chosen by digest

    previous = Previous("v0001-patchcore", frozenset(first.training), frozenset(first.check))
    three = _digests("label-studio", 3)
    second = plan_training_set(previous, three, [])  # 3 annotated normals: the 650 stay
    assert set(second.training) >= set(first.training) and set(second.check) >= set(first.check)
    assert set(second.new) == set(three) and set(second.training) | set(second.check) == {*folder, *three}
    assert second.compare == second.check  # no version trained on a check normal

    relabeled = [first.training[0], first.check[0]]  # an annotator marks two earlier normals defective
    third = plan_training_set(previous, three, relabeled)
    assert not set(relabeled) & {*third.training, *third.check}
    assert set(third.removed) == set(relabeled) and set(third.defects) == set(relabeled)

    remembered = Previous(previous.version, previous.trained, previous.check, frozenset(relabeled))
    again = plan_training_set(remembered, [], [])  # recorded defects stay excluded …
    assert set(again.defects) == set(relabeled) and first.training[0] not in again.training
    newest = plan_training_set(remembered, [first.training[0]], [])  # … until given as normal again
    assert first.training[0] in newest.training and set(newest.defects) == {first.check[0]}

    fresh = plan_training_set(previous, three, [], keep_previous=False)
    assert set(fresh.training) | set(fresh.check) == set(three)

    small = _digests("small", CHECK_MIN_POOL - 1)  # a small project holds nothing out yet
    assert plan_training_set(Previous(), small, []).check == ()
    grown = plan_training_set(Previous("v1", frozenset(small)), _digests("more", 30), [])
    assert set(small) <= set(grown.training)  # what was trained on stays trained on
    assert all(is_check_digest(d) for d in grown.check) and set(grown.check) <= set(grown.new)


def test_mode_is_incremental_only_when_equivalent():
    from types import SimpleNamespace

    from defect_assist.training.mode import choose_mode
    from defect_assist.training.training_set import Previous, plan_training_set

    folder = _digests("folder", 100)
    first = plan_training_set(Previous(), folder, [])
    previous = Previous("v0001-patchcore", frozenset(first.training), frozenset(first.check))
    current = SimpleNamespace(kind="patchcore", version="v0001-patchcore")
    added = plan_training_set(previous, _digests("new", 3), [])
    trained_new = len(set(added.training) - previous.trained)  # a new image may be held out to check
    assert choose_mode("auto", current, "patchcore", added, 0.5) == (
        "incremental",
        f"{trained_new} new normals",
    )
    relabeled = plan_training_set(previous, _digests("new", 3), [first.training[0]])
    mode, why = choose_mode("auto", current, "patchcore", relabeled, 0.5)
    assert mode == "full" and "1 earlier training normals were marked defective" in why
    only_check = plan_training_set(previous, _digests("new", 3), [first.check[0]])  # never trained on
    assert choose_mode("auto", current, "patchcore", only_check, 0.5)[0] == "incremental"
    assert choose_mode("auto", current, "patchcore", plan_training_set(previous, [], []), 0.5) == (
        "full",
        "no new normals",
    )
    assert choose_mode("full", current, "patchcore", added, 0.5) == ("full", "requested")


def test_minimum_number_of_normals_refuses_with_a_reason():
    from defect_assist.training.training_set import (
        MIN_TRAINING_NORMALS,
        Previous,
        TrainingRefused,
        plan_training_set,
        require_minimum,
    )

    three = plan_training_set(Previous(), _digests("ls", 3), [])
    with pytest.raises(TrainingRefused, match=f"only 3 normal images .* at least {MIN_TRAINING_NORMALS}"):
        require_minimum("5", three, 3)
    with pytest.raises(TrainingRefused, match="no normal images annotated yet"):
        require_minimum("5", plan_training_set(Previous(), [], _digests("d", 2)), 0)
    enough = plan_training_set(Previous(), _digests("ls", MIN_TRAINING_NORMALS), [])
    require_minimum("5", enough, MIN_TRAINING_NORMALS)
    with pytest.raises(TrainingRefused, match="2 earlier images no longer found"):
        require_minimum("5", enough, MIN_TRAINING_NORMALS - 2)


def test_train_and_publish_refuses_three_normals_before_training(tmp_path: Path, train_normals):
    from defect_assist.core.settings import Settings
    from defect_assist.core.store import ModelStore
    from defect_assist.training.pipeline import train_and_publish
    from defect_assist.training.training_set import TrainingRefused

    settings = Settings(model_dir=tmp_path / "models", cache_dir=tmp_path / "cache", device="cpu")
    with pytest.raises(TrainingRefused, match="only 3 normal images to train on"):
        train_and_publish("5", train_normals[:3], settings=settings, options={"image_size": 64})
    assert ModelStore(settings.model_dir).versions("5") == []


def _scores(normals, defects=()):
    from defect_assist.training.version_check import VersionScores

    return VersionScores(np.asarray(normals, float), np.asarray(defects, float))


def test_check_rule_keeps_a_clearly_worse_version_from_becoming_current():
    from defect_assist.training.version_check import decide

    current = _scores([0.1] * 58 + [0.6, 0.7], [0.9] * 8 + [0.3] * 2)  # 2 of 60 false positives, 8/10 found
    same = decide(_scores([0.1] * 58 + [0.6, 0.7], [0.9] * 8 + [0.3] * 2), current, current_name="v1")
    assert (
        same.make_current and same.reason == "not worse than v1 on 60 check normals and 10 annotated defects"
    )
    better = decide(_scores([0.1] * 60, [0.9] * 10), current)
    assert better.make_current
    slack = decide(_scores([0.1] * 55 + [0.6] * 5, [0.9] * 7 + [0.3] * 3), current)  # +3 fp (≤ 3), −1 found
    assert slack.make_current, slack.reason

    forgetful = decide(_scores([0.9] * 50 + [0.1] * 10, [0.9] * 10), current, current_name="v1")  # issue 14
    assert not forgetful.make_current
    assert "calls 50 of 60 check normals anomalous (v1: 2, at most 5)" in forgetful.reason
    assert forgetful.metrics["false_positives"] == 50
    blind = decide(_scores([0.1] * 58 + [0.6, 0.7], [0.9] * 5 + [0.2] * 5), current)
    assert not blind.make_current and "finds 5 of 10 annotated defects" in blind.reason
    ranked = decide(_scores([0.1] * 30 + [0.45] * 30, [0.3] * 10), _scores([0.1] * 60, [0.2] * 10))
    assert not ranked.make_current and "image AUROC" in ranked.reason  # same verdicts, worse ranking

    assert decide(_scores([]), None).reason == "first version of the project"
    unchecked = decide(_scores([]), _scores([]))
    assert unchecked.make_current and "unchecked" in unchecked.reason


def test_check_rule_flags_new_normals_the_current_version_calls_defective():
    from defect_assist.training.version_check import decide, suspect_limit

    current = _scores([0.1] * 8)
    poisoned = decide(
        _scores([0.1] * 8), current, np.array([0.95, 0.9, 0.8, 0.99, 0.7, 0.2, 0.97, 0.6]), "v2"
    )
    assert not poisoned.make_current
    assert (
        "7 of 8 new normals look anomalous to v2" in poisoned.reason
        and "check their labels" in poisoned.reason
    )
    assert decide(_scores([0.1] * 8), current, np.array([0.1, 0.2, 0.05])).make_current
    assert decide(_scores([0.1] * 8), current, np.array([0.1, 0.7, 0.05])).make_current  # one is chance
    assert decide(_scores([0.1] * 8), current, np.array([0.9, 0.7, 0.05])).make_current  # 8 checks: 2 too
    assert not decide(_scores([0.1] * 8), current, np.array([0.9, 0.7, 0.6])).make_current
    well_measured = _scores([0.1] * 60)
    assert not decide(well_measured, well_measured, np.array([0.9, 0.7, 0.05])).make_current
    # the limit grows with the current version's own false-positive rate on the check normals
    assert suspect_limit(100, 0, 60) < 20 < suspect_limit(100, 10, 60)


def test_image_archive_links_copies_and_verifies(tmp_path: Path):
    from defect_assist.training.image_archive import ImageArchive, sha256_file

    source = tmp_path / "folder" / "a.JPG"
    source.parent.mkdir()
    source.write_bytes(b"normal tile")
    digest = sha256_file(source)
    archive = ImageArchive(tmp_path / "models" / "p" / "_images", [tmp_path / "cache"])
    assert archive.keep({digest: source}) == 1 and archive.keep({digest: source}) == 0
    kept = archive.find(digest)
    assert kept == tmp_path / "models" / "p" / "_images" / digest[:2] / f"{digest}.jpg"
    assert os.stat(kept).st_ino == os.stat(source).st_ino  # same file system: a hard link
    source.unlink()  # the user's folder is gone: the archive still has it
    assert archive.resolve([digest], {}) == {digest: kept}
    assert archive.not_kept([digest, "0" * 64]) == ["0" * 64]

    cached = tmp_path / "cache" / "ab" / ("ab" + "1" * 62 + ".png")  # kept before: the retrain image cache
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert archive.find(cached.stem) is None  # bytes do not match the name: not trusted
    real = hashlib.sha256(b"x").hexdigest()
    (tmp_path / "cache" / real[:2]).mkdir(exist_ok=True)
    os.replace(cached, tmp_path / "cache" / real[:2] / f"{real}.png")
    assert archive.find(real) == tmp_path / "cache" / real[:2] / f"{real}.png"

    with open(kept, "wb") as handle:  # a hard-linked file changed in place reads as missing
        handle.write(b"changed")
    assert archive.find(digest) is None


def test_store_candidates_promote_and_rollback(tmp_path: Path, small_patchcore):
    from defect_assist.core.store import ModelStore, VersionConflict

    store = ModelStore(tmp_path)
    first = store.publish("7", small_patchcore)
    candidate = store.publish("7", small_patchcore, make_current=False, candidate_reason="worse: 9 fp")
    assert (first.status, candidate.status, candidate.candidate_reason) == (
        "current",
        "candidate",
        "worse: 9 fp",
    )
    assert store.current_version("7") == first.version
    assert [v.status for v in store.versions("7")] == ["current", "candidate"]
    assert [v.version for v in store.candidates("7")] == [candidate.version]
    third = store.publish("7", small_patchcore)
    assert [v.status for v in store.versions("7")] == ["previous", "candidate", "current"]
    assert store.rollback("7").version == first.version  # rollback skips the never-current candidate
    with pytest.raises(VersionConflict, match="is a candidate: promote it"):
        store.rollback("7", candidate.version)
    with pytest.raises(VersionConflict, match="is previous, not a candidate"):
        store.promote("7", third.version)

    promoted = store.promote("7", candidate.version)
    assert promoted.is_current and promoted.status == "current" and promoted.candidate is None
    record = json.loads((promoted.path / "promoted.json").read_text())
    assert record["reason"] == "worse: 9 fp" and record["note"] == "promoted"
    store.set_current("7", third.version)
    assert store.version("7", candidate.version).status == "previous"  # promoted once: no longer a candidate


def test_promote_and_versions_commands_and_routes(tmp_path: Path, small_patchcore, monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from defect_assist.core.settings import get_settings
    from defect_assist.core.store import ModelStore
    from defect_assist_tools.cli import app as cli
    from defect_assist_worker.routes import router

    store = ModelStore(tmp_path / "models")
    store.publish("8", small_patchcore)
    store.publish(
        "8", small_patchcore, make_current=False, candidate_reason="7 of 8 new normals look anomalous"
    )
    runner = CliRunner()
    listing = runner.invoke(cli, ["versions", "--project", "8", "--model-dir", str(store.root), "--json"])
    assert [(v["version"], v["status"], v["candidate_reason"]) for v in json.loads(listing.stdout)] == [
        ("v0001-patchcore", "current", None),
        ("v0002-patchcore", "candidate", "7 of 8 new normals look anomalous"),
    ]
    table = runner.invoke(cli, ["versions", "--project", "8", "--model-dir", str(store.root)])
    assert "candidate" in table.stdout
    args = ["--project", "8", "--model-dir", str(store.root)]
    promoted = runner.invoke(cli, ["promote", *args, "--version", "v0002-patchcore"])
    assert promoted.exit_code == 0 and "current 8/v0002-patchcore" in promoted.stdout
    again = runner.invoke(cli, ["promote", *args, "--version", "v0002-patchcore"])
    assert again.exit_code == 1 and "not a candidate" in again.output
    assert "current 8/v0001-patchcore" in runner.invoke(cli, ["rollback", *args]).stdout

    store.publish("8", small_patchcore, make_current=False, candidate_reason="worse")
    monkeypatch.setenv("MODEL_DIR", str(store.root))
    get_settings.cache_clear()
    try:
        api = FastAPI()
        api.include_router(router)
        with TestClient(api) as client:
            answer = client.post("/versions/v0003-patchcore/promote", params={"project": "8"})
            assert answer.status_code == 200, answer.text
            assert answer.json() | {"created": None} == {
                "project": "8",
                "version": "v0003-patchcore",
                "status": "current",
                "current": True,
                "candidate_reason": None,
                "n_train_images": 24,
                "created": None,
            }
            assert (
                client.post("/versions/v0003-patchcore/promote", params={"project": "8"}).status_code == 409
            )
            assert (
                client.post("/versions/v0099-patchcore/promote", params={"project": "8"}).status_code == 404
            )
            back = client.post("/versions/rollback", params={"project": "8"}).json()
            assert (back["version"], back["status"]) == ("v0002-patchcore", "current")
            chosen = client.post("/versions/rollback", params={"project": "8", "version": "v0001-patchcore"})
            assert chosen.json()["version"] == "v0001-patchcore"
            assert client.post("/versions/rollback", params={"project": "8"}).status_code == 409
    finally:
        get_settings.cache_clear()

"""The backend's Label Studio sync: a *Retrieve predictions* racing it leaves no duplicate prediction.

Label Studio is a fake holding tasks and predictions; the race is replayed deterministically: the
duplicates land after the sync has shown the version, while the project's ``/predict`` is still busy.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest

from defect_assist.serving.label_studio_sync import LabelStudioSync, ProjectActivity

pytestmark = pytest.mark.unit


@dataclass
class FakeStore:
    version: str = "v0002-patchcore"

    def projects(self) -> list[str]:
        return ["7"]

    def current_version(self, project: str) -> str:
        return self.version

    def versions(self, project: str) -> list[Any]:
        return [type("V", (), {"version": v})() for v in ("v0001-patchcore", self.version)]


@dataclass
class FakeLabelStudio:
    tasks: list[int] = field(default_factory=lambda: [1, 2, 3])
    stored: list[dict[str, Any]] = field(default_factory=list)
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    version: str = "v0002-patchcore"

    def ml_backends(self, project: str) -> list[dict[str, Any]]:
        return [{"id": 1, "url": "http://backend", "title": "defect-assist · serving v0002-patchcore"}]

    def task_ids(self, project: str) -> list[int]:
        return list(self.tasks)

    def predictions(self, project: str) -> list[dict[str, Any]]:
        return list(self.stored)

    def retrieve_predictions(self, project: str, tasks: list[int] | None = None) -> None:
        for task in tasks or self.tasks:
            self.stored.append({"id": next(self.ids), "task": task, "model_version": self.version})

    def set_model_version(self, project: str, version: str) -> None:
        pass

    def update_ml_backend(self, backend: int, **fields: Any) -> None:
        pass

    def delete_prediction(self, prediction: int) -> None:
        self.stored = [p for p in self.stored if p["id"] != prediction]


def test_duplicates_stored_after_the_sync_looked_are_removed_once_predict_settles() -> None:
    label_studio = FakeLabelStudio()
    activity = ProjectActivity()
    store: Any = FakeStore()
    sync = LabelStudioSync(store, lambda _: label_studio, idle_for=activity.idle_for, settle=0.0)  # type: ignore[arg-type]
    with activity.predicting("7"):
        assert [s.predicted for s in sync.reconcile()] == [3]
        label_studio.retrieve_predictions("7")  # the user's manual retrieve, stored after the sync looked
        sync.reconcile()  # a /predict of the project is still running: not settled, nothing deleted
        assert len(label_studio.stored) == 6
    assert activity.idle_for("7") < 60
    sync.reconcile()
    by_task = {p["task"]: p["id"] for p in label_studio.stored}
    assert len(label_studio.stored) == 3 and by_task == {1: 4, 2: 5, 3: 6}  # the newest of each task
    sync.reconcile()  # duplicates were found: it looks once more, finds none, and is settled
    label_studio.retrieve_predictions("7")
    sync.reconcile()  # settled: the sync no longer lists the project's predictions every pass
    assert len(label_studio.stored) == 6
    assert sync.shown == {"7": "v0002-patchcore"}


def test_activity_is_bounded_and_counts_overlapping_calls() -> None:
    activity = ProjectActivity(capacity=2)
    assert activity.idle_for("1") == float("inf")
    with activity.predicting("1"), activity.predicting("1"):
        assert activity.idle_for("1") == 0.0
    for project in ("1", "2", "3"):
        with activity.predicting(project):
            pass
    assert activity.idle_for("1") == float("inf")  # dropped: only the 2 most recent are kept
    assert activity.idle_for("3") < 60

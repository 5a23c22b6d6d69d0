"""The command line: train → predict → versions → rollback, and evaluate on an MVTec-layout folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from defect_assist_tools.cli import app

pytestmark = pytest.mark.unit

runner = CliRunner()


def _run(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def tiny_mvtec(make_tiny_mvtec) -> Path:
    """A small MVTec-layout category: 14 train normals, 6 test normals, 3 breaks and 3 uneven."""
    return make_tiny_mvtec()


def test_train_predict_versions_rollback(tiny_mvtec: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "models")
    images = str(tiny_mvtec / "train" / "good")
    first = _run("train", "--images", images, "--project", "3", "-o", "image_size=64", "--model-dir", store)
    assert "published 3/v0001-patchcore" in first
    _run("train", "--images", images, "--project", "3", "-o", "image_size=64", "--model-dir", store)
    listing = json.loads(_run("versions", "--project", "3", "--model-dir", store, "--json"))
    assert [(v["version"], v["current"]) for v in listing] == [
        ("v0001-patchcore", False),
        ("v0002-patchcore", True),
    ]
    assert listing[0]["n_train_images"] == 14 and listing[0]["calibration"]["image_threshold"] > 0

    defect = next((tiny_mvtec / "test" / "break").glob("*.jpg"))
    out = _run(
        "predict",
        str(defect),
        "--project",
        "3",
        "--json",
        "--model-dir",
        store,
        "--masks",
        str(tmp_path / "masks"),
        "--heatmaps",
        str(tmp_path / "heat"),
    )
    record = json.loads(out)
    assert record["source"] == str(defect)
    assert record["label"] in ("normal", "anomalous") and 0 <= record["score"] <= 1
    with Image.open(defect) as original, Image.open(tmp_path / "masks" / f"{defect.stem}_mask.png") as mask:
        assert mask.size == original.size
    assert (tmp_path / "heat" / f"{defect.stem}_heatmap.png").exists()

    assert "current 3/v0001-patchcore" in _run("rollback", "--project", "3", "--model-dir", store)


def test_predict_folder_reports_broken_file_and_continues(tiny_mvtec: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "models")
    _run(
        "train",
        "--images",
        str(tiny_mvtec / "train" / "good"),
        "--project",
        "p",
        "-o",
        "image_size=64",
        "--model-dir",
        store,
    )
    folder = tmp_path / "incoming"
    folder.mkdir()
    for path in sorted((tiny_mvtec / "test" / "good").glob("*.jpg"))[:2]:
        shutil.copy(path, folder)
    (folder / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    lines = [
        json.loads(line)
        for line in _run(
            "predict", str(folder), "--project", "p", "--json", "--model-dir", store
        ).splitlines()
        if line.strip()
    ]
    assert len(lines) == 3
    assert [r["error"] is None for r in lines] == [True, True, False]
    assert "zz_corrupt.jpg" in lines[2]["error"]


def test_evaluate_writes_literature_metrics(tiny_mvtec: Path, tmp_path: Path) -> None:
    out_file = tmp_path / "results.json"
    output = _run("evaluate", "--data", str(tiny_mvtec), "-o", "image_size=96", "--json", str(out_file))
    assert "image AUROC" in output.replace("\n", " ") or "AUROC" in output
    results = json.loads(out_file.read_text())
    keys = {"image_auroc", "pixel_auroc", "image_f1", "pixel_aupro", "fit_seconds", "images_per_second"}
    assert keys <= set(results["categories"]["tile"])
    assert keys <= set(results["mean"])
    assert results["model"] == "patchcore" and results["backbone"] == "tf_efficientnet_lite1"
    assert results["image_size"] == 96
    tile = results["categories"]["tile"]
    assert tile["n_test"] == 12 and tile["n_test_anomalous"] == 6
    assert 0.5 < tile["image_auroc"] <= 1.0  # large defects: better than chance even on 14 normals
    assert 0.5 < tile["pixel_auroc"] <= 1.0
    assert 0.0 <= tile["pixel_aupro"] <= 1.0
    served = tile["served"]  # what annotators see at the served thresholds
    assert served["tp"] + served["fn"] == 6 and served["n_images"] == 12
    assert 0.0 <= served["mean_dice"] <= 1.0 and served["n_masked_defects"] == 6
    assert set(served["per_defect_type"]) == {"break", "uneven"}
    assert set(results["mean"]["served"]) >= {"precision", "recall", "mean_dice", "normals_with_mask"}


def test_evaluate_learns_from_corrected_defects_and_scores_only_the_others(
    tiny_mvtec: Path, tmp_path: Path
) -> None:
    out_file = tmp_path / "corrected.json"
    _run(
        "evaluate",
        "--data",
        str(tiny_mvtec),
        "-o",
        "image_size=64",
        "--corrected",
        "3",
        "--json",
        str(out_file),
    )
    tile = json.loads(out_file.read_text())["categories"]["tile"]
    assert tile["n_test"] == 9 and tile["n_test_anomalous"] == 3  # the 3 corrected images are not scored
    assert tile["corrections"]["n_corrected"] == 3
    assert tile["corrections"]["defect_head"]["n_corrected"] == 3
    assert tile["n_train"] + tile["n_holdout"] == 14 - 3  # a quarter of the normals: the head's negatives


def test_train_learns_served_masks_from_a_folder_of_corrected_defects(
    tiny_mvtec: Path, tmp_path: Path
) -> None:
    defects = tmp_path / "defects"
    defects.mkdir()
    for image in sorted((tiny_mvtec / "test" / "break").glob("*.jpg")):
        shutil.copy(image, defects / image.name)
        shutil.copy(tiny_mvtec / "ground_truth" / "break" / f"{image.stem}_mask.png", defects)
    store = tmp_path / "models"
    images = str(tiny_mvtec / "train" / "good")
    _run(
        "train",
        "--images",
        images,
        "--project",
        "5",
        "-o",
        "image_size=64",
        "--model-dir",
        str(store),
        "--defects",
        str(defects),
    )
    metadata = json.loads(next((store / "5").glob("v0001-*/metadata.json")).read_text())
    assert metadata["extra"]["defect_head"]["n_corrected"] == 3
    assert "labeled anomalies (F1-optimal" in metadata["calibration"]["source"]


def test_evaluate_splits_test_into_fixed_halves(tiny_mvtec: Path) -> None:
    from defect_assist.core.evaluation import load_category, split_of

    test = load_category(tiny_mvtec).test
    halves = {name: [t.path.name for t in test if split_of(t) == name] for name in ("validation", "holdout")}
    assert halves["validation"] and halves["holdout"]
    assert sorted(halves["validation"] + halves["holdout"]) == sorted(t.path.name for t in test)
    assert halves == {name: [t.path.name for t in test if split_of(t) == name] for name in halves}  # stable


def test_evaluate_root_of_categories(tiny_mvtec: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "tile_a").symlink_to(tiny_mvtec, target_is_directory=True)
    (root / "tile_b").symlink_to(tiny_mvtec, target_is_directory=True)
    out_file = tmp_path / "r.json"
    _run(
        "evaluate",
        "--data",
        str(root),
        "-o",
        "image_size=64",
        "--category",
        "tile_b",
        "--json",
        str(out_file),
    )
    assert list(json.loads(out_file.read_text())["categories"]) == ["tile_b"]


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "defect-assist"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("train", "predict", "evaluate", "versions", "rollback"):
        assert command in result.stdout


# --- tables whole at any width (issue 14, item 8), progress off a terminal ------------------------

JOB_ID = "3f2a9c1e-5b7d-4e8f-9a0b-1c2d3e4f5a6b"
VERSION = "v0012-efficientad"
PATH = "/data/magnetic_tile/test/blowhole/e1.jpg"  # 40 characters
REASON = "7 of 8 new normals look anomalous to v0011-efficientad (threshold 0.53)"
ERROR = f"Label Studio unreachable, no export of {PATH}"


def _jobs() -> list[dict]:
    def job(job_id: str, status: str, stage: str, percent: float, **facts: object) -> dict:
        empty = dict.fromkeys(("eta_s", "mode", "version", "current", "check_reason", "error"))
        return {**empty, "id": job_id, "project": "3", "status": status, "stage": stage} | {
            "percent": percent,
            "reason": "cli",
            **facts,
        }

    return [
        job(JOB_ID, "finished", "done", 100.0, eta_s=0.0, mode="incremental", version=VERSION)
        | {"current": False, "made_current": False, "check_reason": REASON},
        job("0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e", "started", "features", 45.3, eta_s=121.0, mode="full"),
        job("9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d", "failed", "fetch", 2.0, error=ERROR),
    ]


def _versions() -> list:
    from defect_assist.core.store import VersionInfo

    meta = {"kind": "efficientad", "backbone": "tf_efficientnet_lite1", "n_train_images": 1250}
    created = {"created": "2025-05-02T08:00:01+00:00"}
    return [
        VersionInfo("3", "v0011-efficientad", Path("/m/3/v0011"), meta | {"update": "full"}, is_current=True),
        VersionInfo(
            "3",
            VERSION,
            Path("/m/3/v0012"),
            meta | {"update": "incremental"} | created,
            candidate={"reason": REASON},
        ),
    ]


def _neighbours() -> list:
    from defect_assist.similarity.index import Neighbour

    hit = {"label": "anomalous", "defect_type": "blowhole", "score": 0.812, "split": "test", "path": PATH}
    other = {"label": "normal", "defect_type": None, "score": None, "split": "train", "stale": True}
    return [
        Neighbour("a", 0.98765, hit),
        Neighbour("b", 0.9, other | {"path": PATH.replace("test", "train")}),
    ]


def _print(kind: str, console) -> None:
    from defect_assist.core.commands import print_versions
    from defect_assist.similarity.commands import print_neighbours
    from defect_assist_worker.commands import print_jobs

    {
        "jobs": lambda: print_jobs(_jobs(), console),
        "versions": lambda: print_versions(_versions(), console),
    }.get(kind, lambda: print_neighbours(_neighbours(), console))()


WHOLE = {
    "jobs": [
        JOB_ID,
        VERSION,
        "candidate",
        "incremental",
        REASON,
        ERROR,
        "0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e",
    ],
    "versions": ["v0011-efficientad", VERSION, "tf_efficientnet_lite1", "2025-05-02T08:00:01+00:00", REASON],
    "similar": [PATH, PATH.replace("test", "train") + " (stale)", "0.9877", "anomalous", "blowhole"],
}


def _columns(output: str) -> str:
    """The table's text column by column (each column's cells joined top to bottom, whitespace removed):
    a value wrapped over several lines of its cell reads whole again."""
    columns: dict[int, list[str]] = {}
    for line in output.splitlines():
        for index, cell in enumerate(line.replace("┃", "│").split("│")[1:-1]):
            columns.setdefault(index, []).append("".join(cell.split()))
    return " ".join("".join(cells) for cells in columns.values())


@pytest.mark.parametrize("kind", ["jobs", "versions", "similar"])
@pytest.mark.parametrize("width", [60, 80, 200])
def test_tables_keep_every_value_whole_at_any_width(kind: str, width: int) -> None:
    from io import StringIO

    from rich.console import Console

    terminal = StringIO()
    _print(kind, Console(file=terminal, width=width, force_terminal=True, color_system=None))
    output = terminal.getvalue()
    assert "…" not in output
    assert max(len(line) for line in output.splitlines()) <= width
    text = _columns(output)
    for value in WHOLE[kind]:
        assert "".join(value.split()) in text, f"{value!r} not whole at width {width}:\n{output}"
    if width >= 80:  # ids on one line: only long paths and reasons wrap
        one_line = [JOB_ID, VERSION] if kind == "jobs" else [VERSION] if kind == "versions" else ["0.9877"]
        for value in one_line:
            assert value in output, f"{value!r} wrapped at width {width}:\n{output}"


@pytest.mark.parametrize("kind", ["jobs", "versions", "similar"])
def test_tables_piped_print_one_line_per_row(kind: str) -> None:
    from io import StringIO

    from rich.console import Console

    piped = StringIO()
    _print(kind, Console(file=piped, width=80))  # not a terminal: logs, `| grep`
    lines = piped.getvalue().splitlines()
    assert "…" not in piped.getvalue()
    for value in WHOLE[kind]:
        assert any(value in line for line in lines), f"{value!r} not on one line:\n{piped.getvalue()}"
    rows = {"jobs": 3, "versions": 2, "similar": 2}[kind]
    assert len(lines) == rows + 4  # top rule, header, header rule, rows, bottom rule


def test_progress_off_a_terminal_prints_a_line_when_a_stage_starts_and_ends() -> None:
    from io import StringIO

    from rich.console import Console

    from defect_assist.core.progress import RichProgress

    log = StringIO()
    with RichProgress(console=Console(file=log, width=80)) as progress:
        assert not progress.live
        for stage in ("features", "coreset"):
            for done in range(101):
                progress(stage, done, 100)
        progress("predict", 3, 10)  # never finished: reported as stopped on exit
    lines = log.getvalue().splitlines()
    for stage in ("features", "coreset", "predict"):
        assert 1 <= sum(line.startswith(f"{stage} ") for line in lines) <= 2, lines
    assert len(lines) == 6
    assert lines[1].startswith("features done: 100/100 in ") and lines[1].endswith("s")
    assert lines[-1].startswith("predict stopped at 3/10")
    with RichProgress(console=Console(file=StringIO(), force_terminal=True)) as progress:
        assert progress.live  # a terminal: one live bar per stage


def test_retrain_wait_off_a_terminal_prints_stages_not_percents(monkeypatch, capsys) -> None:
    import rq.job
    from rq.job import JobStatus

    from defect_assist_worker import commands

    states = [(JobStatus.QUEUED, {"stage": "queued", "percent": 0.0})]
    states += [(JobStatus.STARTED, {"stage": "starting", "percent": 0.0})]
    for stage, total in (("features", 40), ("coreset", 100)):
        states += [
            (JobStatus.STARTED, {"stage": stage, "stage_done": done, "stage_total": total, "percent": done})
            for done in range(0, total, 2)  # polled: the end of a stage is not always seen
        ]
    states += [(JobStatus.FINISHED, {"stage": "done", "stage_done": 100, "stage_total": 100})]

    class FakeJob:
        def __init__(self, status: JobStatus, meta: dict) -> None:
            self.status, self.meta = status, meta
            self.is_finished, self.is_failed = status == JobStatus.FINISHED, False

        @classmethod
        def fetch(cls, job_id: str, connection: object) -> FakeJob:
            return cls(*states.pop(0)) if len(states) > 1 else cls(*states[0])

        def get_status(self) -> JobStatus:
            return self.status

        def return_value(self) -> dict:
            return {"version": VERSION, "current": True}

    monkeypatch.setattr(rq.job, "Job", FakeJob)
    monkeypatch.setattr(commands.time, "sleep", lambda seconds: None)
    commands._wait_for_retrain("3", {"job_id": JOB_ID, "status": "queued"}, None, timeout=60)
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"version": VERSION, "current": True}
    lines = captured.err.splitlines()
    assert len(lines) <= 3 + 2 * 2, lines  # queued, started, finished; start and end of each stage
    assert any(line.startswith("features done: 40/40") for line in lines), lines
    assert any(line.startswith("coreset done: 100/100") for line in lines), lines

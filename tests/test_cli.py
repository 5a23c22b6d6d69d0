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

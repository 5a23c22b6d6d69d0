"""Shared fixtures: dataset locations, small image subsets and temporary model stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Fixture modules of the different areas (Label Studio server, Redis, FiftyOne …).
pytest_plugins: list[str] = ["label_studio_server"]

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("DATASETS_DIR", ROOT.parent / "shared" / "datasets"))
MAGNETIC_TILE = DATASETS / "magnetic_tile"
IMAGENET_SAMPLE = DATASETS / "imagenet_sample"


@pytest.fixture(scope="session")
def magnetic_tile() -> Path:
    if not (MAGNETIC_TILE / "train" / "good").is_dir():
        pytest.fail(f"magnetic_tile dataset missing at {MAGNETIC_TILE} (set DATASETS_DIR)")
    return MAGNETIC_TILE


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    if not IMAGENET_SAMPLE.is_dir():
        pytest.fail(f"imagenet_sample dataset missing at {IMAGENET_SAMPLE} (set DATASETS_DIR)")
    return IMAGENET_SAMPLE


@pytest.fixture(scope="session")
def train_normals(magnetic_tile: Path) -> list[Path]:
    """24 training normals (every 27th file: spread over the acquisition series)."""
    return sorted((magnetic_tile / "train" / "good").glob("*.jpg"))[::27][:24]


@pytest.fixture(scope="session")
def test_images(magnetic_tile: Path) -> dict[str, list[Path]]:
    """A few held-out normals and defect images with large defects (blowhole excluded: tiny)."""
    normals = sorted((magnetic_tile / "test" / "good").glob("*.jpg"))[::15][:8]
    defects = []
    for defect in ("break", "fray", "uneven"):
        defects += sorted((magnetic_tile / "test" / defect).glob("*.jpg"))[::9][:3]
    return {"normal": normals, "anomalous": defects}


@pytest.fixture(scope="session")
def small_patchcore(train_normals: list[Path]):
    """A PatchCore fitted on 24 normals at 128 px (shared by the tests that only read it)."""
    import torch

    from defect_assist.models import create_model

    torch.manual_seed(0)
    model = create_model("patchcore", device="cpu", image_size=128)
    model.fit(train_normals)
    return model

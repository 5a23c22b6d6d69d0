"""Shared fixtures: dataset locations, small image subsets and temporary model stores."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

# Fixture modules of the different areas (Label Studio server, Redis, FiftyOne …).
pytest_plugins: list[str] = ["label_studio_server"]

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("DATASETS_DIR", ROOT.parent / "shared" / "datasets"))
MAGNETIC_TILE = DATASETS / "magnetic_tile"
IMAGENET_SAMPLE = DATASETS / "imagenet_sample"


TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test belongs to exactly one tier (``pytestmark = pytest.mark.unit`` …): tiers select by mark."""
    for item in items:
        tiers = {mark.name for mark in item.iter_markers() if mark.name in TIERS}
        if len(tiers) != 1:
            raise pytest.UsageError(
                f"{item.nodeid}: needs exactly one tier mark of {TIERS}, has {sorted(tiers)}"
            )


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

    from defect_assist.core.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("patchcore", device="cpu", image_size=128)
    model.fit(train_normals)
    return model


def copy_mvtec_subset(
    source: Path,
    root: Path,
    train_every: int,
    n_train: int,
    good_every: int,
    n_good: int,
    defects: Sequence[str],
    defect_every: int,
    n_defect: int,
) -> Path:
    """Copy every ``k``-th image of an MVTec category (with masks) into ``root`` (never into shared/)."""
    picks = [("train/good", train_every, n_train), ("test/good", good_every, n_good)]
    picks += [(f"test/{defect}", defect_every, n_defect) for defect in defects]
    for folder, every, count in picks:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for path in sorted((source / folder).glob("*.jpg"))[::every][:count]:
            shutil.copy(path, root / folder)
            if not folder.endswith("good"):
                (root / "ground_truth" / path.parent.name).mkdir(parents=True, exist_ok=True)
                mask = source / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
                shutil.copy(mask, root / "ground_truth" / path.parent.name)
    return root


@pytest.fixture(scope="session")
def make_tiny_mvtec(tmp_path_factory: pytest.TempPathFactory, magnetic_tile: Path) -> Callable[..., Path]:
    """Factory of small MVTec-layout categories copied from magnetic_tile into a temporary folder.

    ``make_tiny_mvtec(n_train=14, n_good=6, defects=("break", "uneven"), n_defect=3)``; the ``*_every``
    arguments pick every k-th file, so the images spread over the acquisition series.
    """

    def make(
        n_train: int = 14,
        n_good: int = 6,
        defects: Sequence[str] = ("break", "uneven"),
        n_defect: int = 3,
        train_every: int = 40,
        good_every: int = 20,
        defect_every: int = 12,
    ) -> Path:
        root = tmp_path_factory.mktemp("mvtec") / "tile"
        return copy_mvtec_subset(
            magnetic_tile, root, train_every, n_train, good_every, n_good, defects, defect_every, n_defect
        )

    return make

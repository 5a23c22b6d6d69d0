"""EfficientAd offline: teacher distillation (seeded, resumable, anomalib keys) and the model end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from defect_assist.models.efficientad import teacher as teacher_mod
from defect_assist.models.efficientad.teacher import DistillConfig, TeacherInfo, distill_teacher

TINY = {
    "steps": 4,
    "batch_size": 2,
    "crop_size": 64,
    "stat_images": 8,
    "checkpoint_every": 2,
    "holdout_fraction": 0.25,
}


@pytest.fixture(scope="module")
def natural_images(imagenet_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 ImageNet-sample images in ImageFolder layout (symlinks)."""
    root = tmp_path_factory.mktemp("natural")
    for path in sorted(imagenet_sample.rglob("*.JPEG"))[::16][:16]:
        (root / path.parent.name).mkdir(exist_ok=True)
        (root / path.parent.name / path.name).symlink_to(path)
    return root


@pytest.fixture(scope="module")
def tiny_teacher(natural_images: Path, tmp_path_factory: pytest.TempPathFactory) -> TeacherInfo:
    return distill_teacher(
        DistillConfig(data=str(natural_images), **TINY),
        tmp_path_factory.mktemp("t") / "pdn",
        show_progress=False,
    )


def test_tiny_teacher_loads_into_anomalib_pdn(tiny_teacher: TeacherInfo) -> None:
    from anomalib.models.image.efficient_ad.torch_model import SmallPatchDescriptionNetwork

    pdn = SmallPatchDescriptionNetwork(out_channels=384)
    pdn.load_state_dict(torch.load(tiny_teacher.path, weights_only=True), strict=True)
    assert pdn(torch.rand(1, 3, 128, 128)).shape == (1, 384, 24, 24)
    provenance = json.loads(tiny_teacher.path.with_name("provenance.json").read_text())
    assert provenance["config"]["steps"] == 4 and provenance["backbone"] == "tf_efficientnet_lite0"
    assert provenance["n_heldout_images"] > 0 and np.isfinite(provenance["heldout_regression_error"])
    assert provenance["config"]["context"] == 32 and [h["step"] for h in provenance["history"]] == [0, 2, 4]


def test_context_targets_align_with_pdn_output() -> None:
    """The backbone sees crop + context; the targets are the centre cells, on the PDN's output grid."""
    targets = teacher_mod.BackboneTargets(pretrained=False, context=16)
    crops, target = targets.split(torch.rand(2, 3, 96, 96))
    assert crops.shape == (2, 3, 64, 64) and target.shape == (2, targets.channels, 16, 16)
    net = teacher_mod.DistillationNet("small", targets.channels)
    assert net(crops).shape == target.shape
    with pytest.raises(ValueError):
        teacher_mod.BackboneTargets(pretrained=False, context=6)


@pytest.mark.parametrize("size", ["small", "medium"])
def test_folded_teacher_keeps_the_adapter_geometry(size: str) -> None:
    """Folding the adapter into the last layer: anomalib's keys/shapes, same pairwise distances."""
    net = teacher_mod.DistillationNet(size, 40).eval()
    pdn = teacher_mod.build_pdn(size, padding=True).eval()
    pdn.load_state_dict(teacher_mod.folded_teacher_state(net, seed=0), strict=True)
    with torch.no_grad():
        x = torch.rand(2, 3, 64, 64)
        a, b = net(x).flatten(2).transpose(1, 2), pdn(x).flatten(2).transpose(1, 2)
    assert b.shape[-1] == 384
    assert torch.allclose(torch.cdist(a, a), torch.cdist(b, b), atol=1e-3)


def test_distillation_is_seeded_and_resumes(
    natural_images: Path, tiny_teacher: TeacherInfo, tmp_path: Path
) -> None:
    config = DistillConfig(data=str(natural_images), **TINY)
    again = distill_teacher(config, tmp_path / "again", show_progress=False)
    reference = torch.load(tiny_teacher.path, weights_only=True)
    repeated = torch.load(again.path, weights_only=True)
    assert all(torch.equal(reference[k], repeated[k]) for k in reference)  # same seed, same weights

    class Interrupt(Exception):
        pass

    def stop_at_three(stage: str, step: int, total: int, metrics: dict[str, float]) -> None:
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        distill_teacher(config, tmp_path / "resumed", progress=stop_at_three, show_progress=False)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["step"] == 2
    steps_seen: list[int] = []
    resumed = distill_teacher(
        config, tmp_path / "resumed", progress=lambda s, d, t, m: steps_seen.append(d), show_progress=False
    )
    assert steps_seen == [3, 4] and resumed.path.is_file()


def test_official_teacher_is_preferred(
    tiny_teacher: TeacherInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert teacher_mod.official_teacher("small") is None
    installed = teacher_mod.install_for_anomalib(tiny_teacher.path, "small")  # ours: marked, not "official"
    assert installed == teacher_mod.anomalib_teacher_path("small") and installed.is_file()
    assert teacher_mod.official_teacher("small") is None
    installed.with_name(
        installed.name + teacher_mod.OUR_MARKER_SUFFIX
    ).unlink()  # now it looks like anomalib's file
    info = teacher_mod.resolve_teacher("small", "auto", model_dir=tmp_path / "models")
    assert info.source == "official" and info.path == installed
    assert (
        teacher_mod.install_for_anomalib(tiny_teacher.path, "small", overwrite=True) is None
    )  # never replaced


def test_efficientad_end_to_end(
    tiny_teacher: TeacherInfo,
    natural_images: Path,
    train_normals: list[Path],
    test_images: dict[str, list[Path]],
    tmp_path: Path,
) -> None:
    from defect_assist.models import create_model, load_model

    torch.manual_seed(0)
    model = create_model(
        "efficientad",
        device="cpu",
        teacher=str(tiny_teacher.path),
        penalty_dir=str(natural_images),
        image_size=128,
        max_steps=60,
        val_every=30,
        patience=0,
        time_budget_s=0,
    )
    report = model.fit(train_normals)
    assert report.details["steps"] == 60 and report.details["teacher"] == "file"
    normals, defects = test_images["normal"], test_images["anomalous"]
    predictions = model.predict(normals + defects)
    assert all(p.ok for p in predictions)
    for path, prediction in zip(normals + defects, predictions, strict=True):
        from PIL import Image

        width, height = Image.open(path).size
        assert prediction.anomaly_map.shape == (height, width) and prediction.mask.shape == (height, width)
        assert 0.0 <= prediction.score <= 1.0
    raw = np.array([p.raw_score for p in predictions])
    normal_raw, defect_raw = raw[: len(normals)], raw[len(normals) :]
    assert np.median(defect_raw) > np.median(normal_raw)

    model.save(tmp_path / "m")
    reloaded = load_model(tmp_path / "m", device="cpu")
    assert reloaded.predict_one(defects[0]).raw_score == pytest.approx(
        predictions[len(normals)].raw_score, rel=1e-5
    )
    scores, maps = model._infer(model.load_batch(defects[:2]).tensor)
    assert scores.shape == (2,) and maps.shape == (2, 128, 128)

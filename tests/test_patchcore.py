"""PatchCore: the model interface (fit, predict, embed, persistence, incremental update), its parts
(coverage coreset, anomaly map, layer balancing) and the Lightning module inside anomalib's Engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from defect_assist.core.models.patchcore.anomaly_map import AnomalyMapGenerator, gaussian_blur
from defect_assist.core.models.patchcore.config import PatchcoreConfig
from defect_assist.core.models.patchcore.coreset import coverage_select, estimate_radius
from defect_assist.core.models.patchcore.torch_model import FastPatchcoreModel
from defect_assist.core.models.registry import create_model, load_model

pytestmark = pytest.mark.unit


def test_predictions_have_original_size_and_consistent_verdicts(small_patchcore, test_images) -> None:
    images = test_images["normal"][:2] + test_images["anomalous"][:2]
    predictions = small_patchcore.predict(images)
    assert len(predictions) == 4
    for path, prediction in zip(images, predictions, strict=True):
        with Image.open(path) as original:
            assert prediction.anomaly_map.shape == (original.height, original.width)
        assert prediction.mask.shape == prediction.anomaly_map.shape
        assert prediction.mask.dtype == bool
        assert 0.0 <= prediction.score <= 1.0
        assert prediction.is_anomalous == (prediction.score >= 0.5)
        assert prediction.mask.any() == prediction.is_anomalous  # a mask exactly when anomalous


def test_defects_score_higher_than_normals(small_patchcore, test_images) -> None:
    normal = [p.raw_score for p in small_patchcore.predict(test_images["normal"])]
    anomalous = [p.raw_score for p in small_patchcore.predict(test_images["anomalous"])]
    pairs = [a > n for a in anomalous for n in normal]
    assert np.mean(pairs) > 0.8, (normal, anomalous)  # pairwise AUROC on this small subset


def test_bad_image_in_batch_gets_error_and_others_get_results(small_patchcore, test_images, tmp_path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    images = [test_images["normal"][0], broken, test_images["anomalous"][0]]
    predictions = small_patchcore.predict(images, batch_size=3)
    assert [p.ok for p in predictions] == [True, False, True]
    assert "broken.png" in predictions[1].error
    assert predictions[1].anomaly_map is None
    assert predictions[0].source == str(images[0])


def test_array_and_bytes_inputs_match_path_input(small_patchcore, test_images) -> None:
    path = test_images["anomalous"][0]
    from_path = small_patchcore.predict_one(path)
    from_bytes = small_patchcore.predict_one(path.read_bytes())
    rgba = np.dstack(
        [np.asarray(Image.open(path).convert("RGB")), np.full(from_path.mask.shape, 255, np.uint8)]
    )
    from_array = small_patchcore.predict_one(rgba)
    assert from_bytes.raw_score == pytest.approx(from_path.raw_score, rel=1e-5)
    assert from_array.raw_score == pytest.approx(from_path.raw_score, rel=1e-5)


def test_save_load_round_trip(small_patchcore, test_images, tmp_path: Path) -> None:
    small_patchcore.save(tmp_path / "model")
    reloaded = load_model(tmp_path / "model", device="cpu")
    image = test_images["anomalous"][1]
    a, b = small_patchcore.predict_one(image), reloaded.predict_one(image)
    assert b.raw_score == pytest.approx(a.raw_score, rel=1e-6)
    assert np.allclose(a.anomaly_map, b.anomaly_map, atol=1e-6)
    assert reloaded.metadata.kind == "patchcore"
    assert reloaded.calibration == small_patchcore.calibration


def test_calibration_flags_few_heldout_normals(small_patchcore, test_images) -> None:
    # threshold = 99th percentile of held-out normal scores: most unseen normals stay below it
    flagged = [p.is_anomalous for p in small_patchcore.predict(test_images["normal"])]
    assert np.mean(flagged) <= 0.5
    assert small_patchcore.metadata.extra["n_holdout"] == 5


def test_incremental_update_adds_patches_and_keeps_threshold(train_normals, magnetic_tile) -> None:
    model = create_model("patchcore", device="cpu", image_size=96)
    model.fit(train_normals[:12])
    bank_before = model.model.memory_bank.shape[0]
    threshold = model.calibration.image_threshold
    new = sorted((magnetic_tile / "train" / "good").glob("*.jpg"))[1::40][:6]
    details = model.update(new)
    assert details["added_patches"] > 0
    assert model.model.memory_bank.shape[0] == bank_before + details["added_patches"]
    assert model.calibration.image_threshold == threshold
    assert model.metadata.update == "incremental"
    assert model.metadata.n_train_images == 18
    # the new images are now covered: their patches lie within the coverage radius of the bank
    scores = [p.raw_score for p in model.predict(new)]
    assert max(scores) <= model.model.radius * 1.01


@pytest.mark.parametrize("n_features", [3000, 12000], ids=["flat-index", "ivf-index"])
def test_coverage_select_guarantees_radius(n_features: int) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(40, 16))
    features = centres[rng.integers(0, 40, n_features)] + rng.normal(size=(n_features, 16))
    features = features.astype(np.float32)
    radius = estimate_radius(features, 0.5)
    selected = coverage_select(features, radius, chunk=500)
    assert 0 < len(selected) < len(features)
    bank = torch.from_numpy(features[selected])
    nearest = torch.cdist(torch.from_numpy(features), bank).min(dim=1).values
    assert float(nearest.max()) <= radius + 1e-4


def test_training_skips_unreadable_images(train_normals, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"nope")
    model = create_model("patchcore", device="cpu", image_size=64)
    report = model.fit([*train_normals[:6], broken])
    assert report.n_train == 6
    assert model.metadata.n_train_images == 6


def test_unknown_option_is_rejected() -> None:
    with pytest.raises(TypeError, match="unknown options"):
        create_model("patchcore", device="cpu", imagesize=64)


def test_lightning_wrapper_runs_anomalib_steps() -> None:
    """The anomalib Lightning module builds its bank with the coverage coreset and scores batches."""
    from anomalib.data import ImageBatch

    from defect_assist.core.models.patchcore.lightning_model import FastPatchcore

    torch.manual_seed(0)
    module = FastPatchcore(image_size=64)
    module.model.train()
    module.training_step(ImageBatch(image=torch.rand(4, 3, 64, 64)))
    module.fit()
    assert module.model.memory_bank.shape[1] == 40 + 112  # blocks.2 + blocks.4 channels of Lite1
    assert 0 < module.model.memory_bank.shape[0] <= 4 * 8 * 8
    module.model.eval()
    images = torch.rand(2, 3, 64, 64)
    output = module.validation_step(ImageBatch(image=images))
    assert output.pred_score.shape == (2,)
    assert output.anomaly_map.shape[-2:] == (64, 64)
    # the Lightning forward is the served model's scoring (unpadded input)
    scores, maps, _ = module.model.score(images)
    torch.testing.assert_close(output.pred_score, scores, rtol=0, atol=0)
    torch.testing.assert_close(output.anomaly_map.reshape(maps.shape), maps, rtol=0, atol=0)


def test_lightning_defaults_are_the_served_models() -> None:
    from defect_assist.core.models.patchcore.lightning_model import FastPatchcore

    served = create_model("patchcore", device="cpu", image_size=128, pretrained=False).model
    lightning = FastPatchcore(image_size=128, pre_trained=False).model
    defaults = PatchcoreConfig()
    assert lightning.backbone == served.backbone == "tf_efficientnet_lite1"
    assert list(lightning.layers) == list(served.layers) == defaults.layers == ["blocks.2", "blocks.4"]
    for name in ("layer_weights", "num_neighbors", "coverage_quantile", "max_bank", "anomaly_map_sigma"):
        assert getattr(lightning, name) == getattr(served, name), name
    assert lightning.anomaly_map_sigma == 24.0 * 128 / 256  # σ 24 per 256 px, scaled like the served one
    assert lightning.layer_weights["blocks.2"] > 1.0 > lightning.layer_weights["blocks.4"]  # balanced
    torch.testing.assert_close(lightning.anomaly_map_generator.kernel, served.anomaly_map_generator.kernel)


@pytest.mark.slow
def test_lightning_module_fits_and_predicts_through_anomalib_engine(make_tiny_mvtec, tmp_path: Path) -> None:
    """anomalib's Engine: fit on a tiny MVTec copy, test (metrics) and predict (scores and maps)."""
    from anomalib.data import Folder
    from anomalib.engine import Engine

    from defect_assist.core.models.patchcore.lightning_model import FastPatchcore

    root = make_tiny_mvtec(n_train=14, n_good=6, defects=("break", "uneven"), n_defect=3)
    datamodule = Folder(
        name="tile",
        root=root,
        normal_dir="train/good",
        abnormal_dir=["test/break", "test/uneven"],
        normal_test_dir="test/good",
        mask_dir=["ground_truth/break", "ground_truth/uneven"],
        train_batch_size=8,
        eval_batch_size=8,
        num_workers=0,
        val_split_mode="same_as_test",
    )
    torch.manual_seed(0)
    size = 128
    model = FastPatchcore(image_size=size, visualizer=False)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    assert 0 < model.model.memory_bank.shape[0] <= 14 * (size // 8) ** 2  # coverage coreset of 14 images
    assert model.model.radius > 0

    (metrics,) = engine.test(model=model, datamodule=datamodule)
    assert {"image_AUROC", "pixel_AUROC"} <= set(metrics)
    assert metrics["image_AUROC"] > 0.6 and metrics["pixel_AUROC"] > 0.55, metrics

    batches = engine.predict(model=model, datamodule=datamodule)
    scores = torch.cat([b.pred_score.reshape(-1) for b in batches])
    labels = torch.cat([b.gt_label.reshape(-1) for b in batches]).bool()
    maps = torch.cat([b.anomaly_map.reshape(-1, size, size) for b in batches])
    assert len(scores) == len(maps) == 6 + 2 * 3
    assert all(b.anomaly_map.shape[-2:] == b.image.shape[-2:] == (size, size) for b in batches)
    assert torch.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()  # post-processed
    assert torch.isfinite(maps).all()
    assert scores[labels].mean() > scores[~labels].mean(), (scores, labels)


@pytest.mark.parametrize("sigma", [4, 8, 16])
def test_separable_blur_equals_anomalib_gaussian_blur(sigma: int) -> None:
    from anomalib.models.components import GaussianBlur2d

    size = 2 * int(4.0 * sigma + 0.5) + 1
    reference = GaussianBlur2d(kernel_size=(size, size), sigma=(sigma, sigma), channels=1)
    maps = torch.rand(2, 1, 160, 192)
    assert torch.allclose(gaussian_blur(maps, sigma), reference(maps), atol=1e-4)
    assert torch.allclose(AnomalyMapGenerator(sigma).blur(maps), reference(maps), atol=1e-4)


def _previous_gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """``torch_model.gaussian_blur`` before the map moved to anomaly_map.py (kernel built per call)."""
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma * sigma))
    kernel = kernel / kernel.sum()
    mode = "reflect" if radius < min(maps.shape[-2:]) else "replicate"
    padded = F.pad(maps, (radius, radius, radius, radius), mode=mode)
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))


def _previous_anomaly_map(grid: torch.Tensor, size: int, sigma: float, valid: torch.Tensor | None):
    """``FastPatchcoreModel.score``'s map before the refactor (incl. ``valid_smoothing``)."""
    if valid is None:
        return _previous_gaussian_blur(F.interpolate(grid, size=(size, size)), sigma)
    upsampled = F.interpolate(grid, size=valid.shape[-2:])
    weights = valid[:, None].to(upsampled.dtype)
    blurred = _previous_gaussian_blur(upsampled * weights, sigma)
    return blurred / _previous_gaussian_blur(weights, sigma).clamp_min(1e-6) * weights


@pytest.mark.parametrize("sigma", [24.0, 12.0, 9.0, 6.75, 2.0])  # 256 px default, 128/96/72/… px scalings
@pytest.mark.parametrize("letterboxed", [False, True])
def test_anomaly_map_generator_equals_previous_maps_exactly(sigma: float, letterboxed: bool) -> None:
    """Bit-identical to the pre-refactor map on random patch grids (float32, CPU)."""
    generator = AnomalyMapGenerator(sigma)
    torch.manual_seed(int(sigma * 4))
    for height, width, size in [(32, 32, 256), (16, 16, 128), (12, 12, 96), (4, 4, 32)]:
        grid = torch.rand(3, 1, height, width) * 40
        valid = None
        if letterboxed:  # image rows 10..size-20 in the 1st, full in the 2nd, columns 5..size//2 in the 3rd
            valid = torch.zeros(3, size, size, dtype=torch.bool)
            valid[0, 10 : size - 20] = True
            valid[1] = True
            valid[2, :, 5 : size // 2] = True
        expected = _previous_anomaly_map(grid, size, sigma, valid)
        got = generator(grid, (size, size), valid)
        assert got.shape == (3, 1, size, size)
        assert torch.equal(got, expected), (sigma, size, float((got - expected).abs().max()))


def test_anomaly_map_kernel_is_built_once_and_not_saved(monkeypatch: pytest.MonkeyPatch) -> None:
    from defect_assist.core.models.patchcore import anomaly_map

    generator = AnomalyMapGenerator(6.0)
    assert generator.kernel.shape == (2 * int(4 * 6.0 + 0.5) + 1,)
    assert float(generator.kernel.sum()) == pytest.approx(1.0)
    monkeypatch.setattr(anomaly_map, "gaussian_kernel", lambda *a, **k: pytest.fail("kernel rebuilt"))
    generator(torch.rand(1, 1, 8, 8), (64, 64), torch.ones(1, 64, 64, dtype=torch.bool))
    assert "kernel" not in generator.state_dict()  # derived from sigma: checkpoints stay compatible


def test_embed_fills_both_parts_with_unit_rows(small_patchcore, test_images) -> None:
    images = test_images["normal"][:2] + test_images["anomalous"][:3]
    loaded = small_patchcore.load_batch(images)
    embedding = small_patchcore.embed(loaded.tensor)
    dim = sum(small_patchcore.model.layer_channels.values())
    assert embedding.pooled.shape == embedding.defect.shape == (5, dim)
    for part in (embedding.pooled, embedding.defect):
        assert torch.isfinite(part).all()
        torch.testing.assert_close(part.norm(dim=1), torch.ones(5))
    assert not torch.allclose(embedding.pooled, embedding.defect)  # the defect part is weighted
    rows = small_patchcore.embed_images(images, batch_size=2)
    np.testing.assert_allclose(rows.pooled, embedding.pooled.numpy(), atol=1e-5)
    np.testing.assert_allclose(rows.defect, embedding.defect.numpy(), atol=1e-5)


def test_balanced_layers_weigh_each_layer_equally_per_channel() -> None:
    balanced = FastPatchcoreModel(backbone="tf_efficientnet_lite0", pretrained=False)
    plain = FastPatchcoreModel(backbone="tf_efficientnet_lite0", pretrained=False, balance_layers=False)
    plain.load_state_dict(balanced.state_dict())
    assert plain.layer_weights == {"blocks.2": 1.0, "blocks.4": 1.0}
    channels = balanced.layer_channels  # blocks.2: 40, blocks.4: 112
    weights = balanced.layer_weights
    # squared weight x channels is the same for every layer: each layer's distance counts equally
    assert weights["blocks.2"] ** 2 * channels["blocks.2"] == pytest.approx(
        weights["blocks.4"] ** 2 * channels["blocks.4"]
    )
    images = torch.rand(2, 3, 64, 64)
    first = channels["blocks.2"]
    with torch.no_grad():
        unweighted, weighted = plain.patch_embedding(images), balanced.patch_embedding(images)
    torch.testing.assert_close(weighted[:, :first], unweighted[:, :first] * weights["blocks.2"])
    torch.testing.assert_close(weighted[:, first:], unweighted[:, first:] * weights["blocks.4"])


def test_models_saved_before_layer_balancing_load_unbalanced(small_patchcore, tmp_path: Path) -> None:
    small_patchcore.save(tmp_path)
    payload = torch.load(tmp_path / "weights.pt", weights_only=False)
    payload["config"].pop("balance_layers")  # as written before the option existed
    torch.save(payload, tmp_path / "weights.pt")
    restored = load_model(tmp_path, device="cpu")
    assert restored.config.balance_layers is False

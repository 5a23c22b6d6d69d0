"""IKD: the losses (AHSM, CSL) on hand-checked tensors, the anomaly map, the model end to end on a
tiny MVTec copy (fit, predict, save/load, embeddings) and the Lightning module in anomalib's Engine."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from defect_assist.core.models.ikd import anomaly_map
from defect_assist.core.models.ikd.anomaly_map import AnomalyMapGenerator
from defect_assist.core.models.ikd.loss import IkdLoss, ahsm_loss, csl_loss, discrepancy
from defect_assist.core.models.registry import create_model, load_model

pytestmark = pytest.mark.unit


def _features(*vectors: tuple[float, ...]) -> torch.Tensor:
    """One feature vector per sample at a single position: ``(B, C, 1, 1)``."""
    return torch.tensor(vectors, dtype=torch.float32)[:, :, None, None]


# ------------------------------------------------------------------------------------------ losses
def test_discrepancy_is_one_minus_cosine_per_pixel() -> None:
    teacher = _features((1.0, 0.0), (1.0, 1.0), (3.0, 4.0))
    student = _features((0.0, 2.0), (2.0, 2.0), (-3.0, -4.0))
    # orthogonal -> 1, parallel (any length) -> 0, opposite -> 2
    torch.testing.assert_close(discrepancy(teacher, student)[:, 0, 0], torch.tensor([1.0, 0.0, 2.0]))


def test_ahsm_averages_the_pixels_at_or_above_the_batch_mean() -> None:
    d = torch.tensor([[0.1, 0.2], [0.3, 0.6]], requires_grad=True)
    # mean 0.3 -> hard pixels {0.3, 0.6} -> (0.3 + 0.6) / 2
    loss = ahsm_loss(d, alpha=0.0)
    assert float(loss.detach()) == pytest.approx(0.45)
    loss.backward()  # only the hard pixels get a gradient, 1/|H| each
    torch.testing.assert_close(d.grad, torch.tensor([[0.0, 0.0], [0.5, 0.5]]))


def test_ahsm_threshold_adapts_with_alpha_times_std() -> None:
    d = torch.tensor([0.1, 0.2, 0.3, 0.6])
    std = math.sqrt(((0.1 - 0.3) ** 2 + (0.2 - 0.3) ** 2 + 0.0 + (0.6 - 0.3) ** 2) / 4)  # population σ
    assert 0.3 + std == pytest.approx(0.48708, abs=1e-5)  # threshold μ + 1σ: only 0.6 is hard
    assert float(ahsm_loss(d, alpha=1.0)) == pytest.approx(0.6)
    assert float(ahsm_loss(d, alpha=-10.0)) == pytest.approx(0.3)  # every pixel: the plain mean
    assert float(ahsm_loss(torch.full((5,), 0.25), alpha=2.0)) == pytest.approx(0.25)  # σ 0: all


def test_csl_compares_the_pairwise_sample_similarities_of_teacher_and_student() -> None:
    teacher = _features((1.0, 0.0), (0.0, 1.0))  # S_t = [[1, 0], [0, 1]]
    student = _features((2.0, 0.0), (3.0, 3.0))  # S_s = [[1, 1/√2], [1/√2, 1]] (lengths ignored)
    expected = (0 + 2 * (0 - 1 / math.sqrt(2)) ** 2 + 0) / (1 * 2**2)  # Σ_ij (S_t - S_s)² / (P B²)
    assert expected == pytest.approx(0.25)
    assert float(csl_loss(teacher, student)) == pytest.approx(expected)
    # two positions, the second identical in both: the same sum over twice the positions
    teacher2 = torch.cat([teacher, teacher], dim=3)
    student2 = torch.cat([student, teacher], dim=3)
    assert float(csl_loss(teacher2, student2)) == pytest.approx(expected / 2)


def test_csl_ignores_a_common_rotation_and_vanishes_for_a_batch_of_one() -> None:
    teacher = _features((1.0, 0.0), (0.6, 0.8), (0.0, 1.0))
    rotated = _features((0.0, 1.0), (-0.8, 0.6), (-1.0, 0.0))  # every vector turned by 90°
    assert float(csl_loss(teacher, rotated)) == pytest.approx(0.0, abs=1e-7)
    assert float(discrepancy(teacher, rotated).mean()) == pytest.approx(1.0)  # pixel-wise it is far off
    assert float(csl_loss(teacher[:1], _features((5.0, -1.0)))) == pytest.approx(0.0)


def test_ikd_loss_sums_ahsm_and_weighted_csl_over_levels() -> None:
    teacher = [_features((1.0, 0.0), (0.0, 1.0)), _features((1.0, 0.0, 0.0), (0.0, 0.0, 1.0))]
    student = [_features((0.0, 1.0), (0.0, 1.0)), _features((1.0, 0.0, 0.0), (1.0, 0.0, 0.0))]
    # level 1: d = [1, 0] -> hard {1} -> 1; S_t = I, S_s = all ones -> CSL = 2 / 4 = 0.5
    # level 2: d = [0, 1] -> 1; same similarities -> CSL 0.5
    loss = IkdLoss(csl_weight=0.5, ahsm_alpha=0.0)
    assert float(loss(teacher, student)) == pytest.approx((1 + 1) + 0.5 * (0.5 + 0.5))
    assert loss.last == pytest.approx({"ahsm": 2.0, "csl": 1.0})


# ------------------------------------------------------------------------------------------ map
def test_anomaly_map_shape_levels_and_combination() -> None:
    teacher = [torch.ones(2, 4, 8, 8), torch.ones(2, 6, 4, 4)]
    student = [torch.ones(2, 4, 8, 8), -torch.ones(2, 6, 4, 4)]  # level 1: d = 0; level 2: d = 2
    summed = AnomalyMapGenerator(sigma=2.0, combine="sum")(teacher, student, (32, 32))
    assert summed.shape == (2, 1, 32, 32)
    torch.testing.assert_close(summed, torch.ones(2, 1, 32, 32))  # mean of 0 and 2, blur keeps constants
    product = AnomalyMapGenerator(sigma=2.0, combine="product")(teacher, student, (32, 32))
    torch.testing.assert_close(product, torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="map_combine"):
        AnomalyMapGenerator(combine="max")


@pytest.mark.parametrize("sigma", [1.0, 4.0, 6.0])
def test_anomaly_map_blur_equals_anomalib_gaussian_blur(sigma: float) -> None:
    from anomalib.models.components import GaussianBlur2d

    size = 2 * int(4.0 * sigma + 0.5) + 1
    reference = GaussianBlur2d(kernel_size=(size, size), sigma=(sigma, sigma), channels=1)
    maps = torch.rand(2, 1, 48, 64)
    torch.testing.assert_close(AnomalyMapGenerator(sigma).blur(maps), reference(maps), atol=1e-5, rtol=0)
    delta = torch.zeros(1, 1, 81, 81)  # wider than the kernel: reflect padding
    delta[0, 0, 40, 40] = 1.0
    blurred = AnomalyMapGenerator(sigma).blur(delta)
    assert float(blurred.sum()) == pytest.approx(1.0, abs=1e-5)  # mass kept, peak at the centre
    assert blurred.flatten().argmax().item() == 40 * 81 + 40


def test_anomaly_map_kernel_is_built_once_and_not_saved(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = AnomalyMapGenerator(3.0)
    assert generator.kernel.shape == (2 * int(4 * 3.0 + 0.5) + 1,)
    monkeypatch.setattr(anomaly_map, "gaussian_kernel", lambda *a, **k: pytest.fail("kernel rebuilt"))
    valid = torch.ones(1, 32, 32, dtype=torch.bool)
    valid[:, :, 20:] = False
    out = generator([torch.rand(1, 3, 8, 8)], [torch.rand(1, 3, 8, 8)], (32, 32), valid)
    assert out.shape == (1, 1, 32, 32) and float(out[..., 20:].abs().max()) == 0.0  # zero on padding
    assert "kernel" not in generator.state_dict()


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_tile(make_tiny_mvtec) -> Path:
    """12 train normals, 3 test normals, 2 break + 2 uneven (with masks)."""
    return make_tiny_mvtec(n_train=12, n_good=3, n_defect=2)


@pytest.fixture(scope="module")
def tiny_ikd(tiny_tile: Path):
    """IKD at 64 px, 3 epochs of 12 normals (seconds on 2 cores)."""
    torch.manual_seed(0)
    model = create_model("ikd", device="cpu", image_size=64, epochs=3, train_batch_size=4)
    model.fit(sorted((tiny_tile / "train" / "good").glob("*.jpg")), seed=0)
    return model


def test_tiny_ikd_trains_and_predicts_maps_at_each_image_size(tiny_ikd, tiny_tile: Path) -> None:
    from PIL import Image

    details = tiny_ikd.metadata.extra
    # 12 normals: 5 held out for calibration, 7 trained on in batches of 4 + 3 -> 2 steps per epoch
    assert details["epochs"] == 3 and details["steps"] == 6 and len(details["history"]) == 3
    assert details["history"][-1]["val_loss"] < details["history"][0]["val_loss"] + 1e-3
    images = sorted((tiny_tile / "test").rglob("*.jpg"))
    predictions = tiny_ikd.predict(images, batch_size=4)
    assert len(predictions) == 7
    for path, prediction in zip(images, predictions, strict=True):
        with Image.open(path) as original:
            assert prediction.anomaly_map.shape == (original.height, original.width)
        assert np.isfinite(prediction.anomaly_map).all() and 0.0 <= prediction.score <= 1.0
        assert prediction.mask.shape == prediction.anomaly_map.shape and prediction.mask.dtype == bool


def test_tiny_ikd_save_load_round_trip(tiny_ikd, tiny_tile: Path, tmp_path: Path) -> None:
    tiny_ikd.save(tmp_path / "model")
    state = torch.load(tmp_path / "model" / "weights.pt", weights_only=False)["state"]
    assert set(state) == {"student"}  # the teacher comes from the offline backbone package
    reloaded = load_model(tmp_path / "model", device="cpu")
    assert reloaded.kind == "ikd" and reloaded.config == tiny_ikd.config
    image = sorted((tiny_tile / "test" / "break").glob("*.jpg"))[0]
    a, b = tiny_ikd.predict_one(image), reloaded.predict_one(image)
    assert b.raw_score == pytest.approx(a.raw_score, rel=1e-6)
    np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-6)


def test_tiny_ikd_embeddings_have_unit_rows(tiny_ikd, tiny_tile: Path) -> None:
    images = sorted((tiny_tile / "test").rglob("*.jpg"))[:3]
    rows = tiny_ikd.embed_images(images, batch_size=2)
    assert rows.pooled.shape == rows.defect.shape == (3, 24 + 40 + 112)
    np.testing.assert_allclose(np.linalg.norm(rows.pooled, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(rows.defect, axis=1), 1.0, atol=1e-5)


def test_teacher_is_pretrained_and_frozen_student_random(tiny_ikd) -> None:
    from defect_assist.core import backbones

    weights = backbones.pretrained_state_dict("tf_efficientnet_lite0")
    teacher = tiny_ikd.model.teacher.feature_extractor.state_dict()
    torch.testing.assert_close(teacher["conv_stem.weight"], weights["conv_stem.weight"])
    assert not any(p.requires_grad for p in tiny_ikd.model.teacher.parameters())
    assert not torch.allclose(
        tiny_ikd.model.student.feature_extractor.conv_stem.weight, weights["conv_stem.weight"]
    )
    assert len(tiny_ikd.model.student.feature_extractor.blocks) == 5  # truncated after blocks.4


@pytest.mark.slow
def test_lightning_module_fits_and_predicts_through_anomalib_engine(tiny_tile: Path, tmp_path: Path) -> None:
    from anomalib.data import Folder
    from anomalib.engine import Engine

    from defect_assist.core.models.ikd.lightning_model import Ikd

    datamodule = Folder(
        name="tile",
        root=tiny_tile,
        normal_dir="train/good",
        abnormal_dir=["test/break", "test/uneven"],
        normal_test_dir="test/good",
        mask_dir=["ground_truth/break", "ground_truth/uneven"],
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        val_split_mode="same_as_test",
    )
    torch.manual_seed(0)
    model = Ikd(image_size=64, visualizer=False)
    engine = Engine(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=1, enable_progress_bar=False
    )
    engine.fit(model=model, datamodule=datamodule)
    batches = engine.predict(model=model, datamodule=datamodule)
    scores = torch.cat([b.pred_score.reshape(-1) for b in batches])
    assert len(scores) == 3 + 2 * 2
    assert all(b.anomaly_map.shape[-2:] == (64, 64) for b in batches)
    assert torch.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()

"""CFA: anomalib's CfaModel on the offline backbone (no download), its loss and map as anomalib's,
the cached-feature training equal to anomalib's step, and the model end to end on a tiny MVTec copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defect_assist.core.models.cfa.anomaly_map import AnomalyMapGenerator
from defect_assist.core.models.cfa.loss import CfaLoss
from defect_assist.core.models.cfa.torch_model import OfflineCfaModel
from defect_assist.core.models.registry import create_model, load_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def cfa_model() -> OfflineCfaModel:
    torch.manual_seed(0)
    return OfflineCfaModel(backbone="tf_efficientnet_lite0")


def test_offline_backbone_is_pretrained_truncated_and_sizes_the_descriptor(cfa_model) -> None:
    from defect_assist.core import backbones

    weights = backbones.pretrained_state_dict("tf_efficientnet_lite0")
    extractor = cfa_model.feature_extractor.feature_extractor
    torch.testing.assert_close(extractor.conv_stem.weight, weights["conv_stem.weight"])
    assert len(extractor.blocks) == 5  # nothing after blocks.4 runs
    assert cfa_model.feature_extractor.out_dims == [24, 40, 112]
    assert cfa_model.descriptor.layer.conv2d.in_channels == 176 + 2  # CoordConv adds x, y
    assert cfa_model.get_scale((64, 64)) == torch.Size([16, 16])


def test_descriptor_equals_anomalibs_pooling_and_coordconv(cfa_model) -> None:
    """anomalib's Descriptor.forward (non-EfficientNet-B5 branch) on the same features and layer."""
    from anomalib.models.image.cfa.torch_model import Descriptor

    features = [torch.rand(2, 24, 16, 16), torch.rand(2, 40, 8, 8), torch.rand(2, 112, 4, 4)]
    reference = Descriptor.__new__(Descriptor)
    torch.nn.Module.__init__(reference)
    reference.backbone, reference.layer = "resnet18", cfa_model.descriptor.layer
    torch.testing.assert_close(cfa_model.descriptor(features), reference(features))


def test_memory_bank_is_the_mean_target_feature_per_position(cfa_model) -> None:
    features = [torch.rand(3, 176, 4, 4), torch.rand(2, 176, 4, 4)]
    cfa_model.initialize_centroid_from_features(features)
    with torch.no_grad():
        expected = cfa_model.descriptor.layer(torch.cat(features)).mean(dim=0).reshape(176, 16)
    assert cfa_model.memory_bank.shape == (176, 16)
    torch.testing.assert_close(cfa_model.memory_bank, expected)


def test_cfa_loss_is_anomalibs_hinge_on_sorted_distances() -> None:
    """By hand: r = 1, K = 2, J = 1; distances of one patch to 4 centroids."""
    distance = torch.tensor([[[4.0, 0.25, 9.0, 1.5]]])  # sorted: 0.25, 1.5, 4, 9
    loss = CfaLoss(num_nearest_neighbors=2, num_hard_negative_features=1, radius=1.0)
    attraction = (max(0, 0.25 - 1) + max(0, 1.5 - 1)) / 2  # the K nearest inside r²
    # anomalib's repulsion takes the sorted distances from index J on: 1.5 and 4
    repulsion = (max(0, 1 - 1.5 - 0.1) + max(0, 1 - 4 - 0.1)) / 2
    assert float(loss(distance).detach()) == pytest.approx(1000 * (attraction + repulsion))


def test_anomaly_map_scores_as_anomalib_and_blurs_with_a_prebuilt_kernel() -> None:
    from anomalib.models.image.cfa.anomaly_map import AnomalyMapGenerator as Reference

    distance = torch.rand(2, 64, 10) * 5
    ours = AnomalyMapGenerator(num_nearest_neighbors=3, sigma=4.0)
    expected = Reference(num_nearest_neighbors=3, sigma=4)(
        distance=distance, scale=(8, 8), image_size=(64, 64)
    )
    got = ours(distance=distance, scale=(8, 8), image_size=(64, 64))
    assert got.shape == (2, 1, 64, 64)
    torch.testing.assert_close(got, expected)
    assert "blur.kernel" not in ours.state_dict()
    valid = torch.zeros(2, 64, 64, dtype=torch.bool)
    valid[:, 8:56] = True
    masked = ours(distance=distance, scale=(8, 8), image_size=(64, 64), valid=valid)
    assert float(masked[:, :, :8].abs().max()) == 0.0 and torch.isfinite(masked).all()


def test_cached_feature_step_equals_anomalibs_forward(cfa_model) -> None:
    """Training on cached patch features gives anomalib's training-mode distances exactly."""
    images = torch.rand(2, 3, 64, 64)
    cfa_model.initialize_centroid([images])
    cfa_model.train()
    try:
        from_images = cfa_model(images)  # anomalib's forward: backbone, descriptor, distances
    finally:
        cfa_model.eval()
    cached = cfa_model.compute_distance(cfa_model.descriptor.layer(cfa_model.patch_features(images)))
    torch.testing.assert_close(cached, from_images)


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_tile(make_tiny_mvtec) -> Path:
    return make_tiny_mvtec(n_train=12, n_good=3, n_defect=2)


@pytest.fixture(scope="module")
def tiny_cfa(tiny_tile: Path):
    """CFA at 64 px, 3 epochs on 7 normals (5 held out for calibration)."""
    torch.manual_seed(0)
    model = create_model("cfa", device="cpu", image_size=64, epochs=3)
    model.fit(sorted((tiny_tile / "train" / "good").glob("*.jpg")), seed=0)
    return model


def test_tiny_cfa_trains_and_predicts_maps_at_each_image_size(tiny_cfa, tiny_tile: Path) -> None:
    from PIL import Image

    details = tiny_cfa.metadata.extra
    assert details["epochs"] == 3 and details["steps"] == 6 and details["memory_bank"] == [176, 256]
    losses = [h["val_loss"] for h in details["history"]]
    assert losses[-1] < losses[0]  # the descriptor pulls normal features towards the centroids
    images = sorted((tiny_tile / "test").rglob("*.jpg"))
    predictions = tiny_cfa.predict(images, batch_size=4)
    for path, prediction in zip(images, predictions, strict=True):
        with Image.open(path) as original:
            assert prediction.anomaly_map.shape == (original.height, original.width)
        assert np.isfinite(prediction.anomaly_map).all() and 0.0 <= prediction.score <= 1.0
        assert prediction.mask.shape == prediction.anomaly_map.shape and prediction.mask.dtype == bool


def test_tiny_cfa_save_load_round_trip_and_embeddings(tiny_cfa, tiny_tile: Path, tmp_path: Path) -> None:
    tiny_cfa.save(tmp_path / "model")
    reloaded = load_model(tmp_path / "model", device="cpu")
    assert reloaded.kind == "cfa" and reloaded.config == tiny_cfa.config
    image = sorted((tiny_tile / "test" / "break").glob("*.jpg"))[0]
    a, b = tiny_cfa.predict_one(image), reloaded.predict_one(image)
    assert b.raw_score == pytest.approx(a.raw_score, rel=1e-6)
    np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-6)
    rows = reloaded.embed_images(sorted((tiny_tile / "test").rglob("*.jpg"))[:3], batch_size=2)
    assert rows.pooled.shape == rows.defect.shape == (3, 176)
    np.testing.assert_allclose(np.linalg.norm(rows.pooled, axis=1), 1.0, atol=1e-5)


def test_training_steps_sample_a_share_of_the_grid_positions(cfa_model) -> None:
    from defect_assist.core.models.cfa.config import CfaConfig
    from defect_assist.core.models.cfa.trainer import DescriptorTrainer

    target = torch.rand(2, 5, 8, 8)
    full = target.flatten(2).transpose(1, 2)  # (B, h·w, C), as anomalib's compute_distance reshapes
    for fraction, expected in ((1.0, 64), (0.25, 16)):
        trainer = DescriptorTrainer(
            cfa_model, CfaConfig(position_fraction=fraction), torch.device("cpu"), print
        )
        trainer.generator = torch.Generator().manual_seed(0)
        sampled = trainer.sampled(target)
        assert sampled.shape == (2, expected, 5)
        rows = [int((full[0] == row).all(dim=1).nonzero()) for row in sampled[0]]
        assert len(set(rows)) == expected  # distinct positions of the grid ...
        torch.testing.assert_close(sampled[1], full[1, rows])  # ... the same ones for every image

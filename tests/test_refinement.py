"""Learning from corrected masks: the defect head on PatchCore's patch inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defect_assist.core.models.registry import create_model, load_model
from defect_assist.core.refinement import DefectHead, patch_shares
from defect_assist.core.served_metrics import dice_iou

pytestmark = pytest.mark.unit


def test_patch_shares_count_the_defect_area_of_each_patch_in_the_letterboxed_input() -> None:
    mask = np.zeros((8, 16), bool)
    mask[:, :4] = True  # the left quarter of a landscape image
    shares = patch_shares(mask, top=4, left=0, height=8, width=16, size=16, grid=4)
    assert shares.shape == (4, 4)
    # rows 1-2 of the 4x4 grid hold the image; its left quarter is the first column of patches
    assert torch.allclose(shares[1:3, 0], torch.ones(2))
    assert float(shares[0].sum()) == 0.0 and float(shares[:, 1:].sum()) == 0.0


def test_head_probability_is_the_logistic_of_standardised_inputs() -> None:
    head = DefectHead(
        torch.tensor([2.0, -1.0]), bias=0.5, mean=torch.tensor([1.0, 0.0]), std=torch.tensor([2.0, 1.0])
    )
    inputs = torch.tensor([[[[3.0]], [[1.0]]]])  # (1, 2, 1, 1)
    # standardised (1, 1): logit 2 - 1 + 0.5 = 1.5
    assert float(head.probabilities(inputs)) == pytest.approx(1 / (1 + np.exp(-1.5)), abs=1e-6)


def _defect_with_mask(path: Path, magnetic_tile: Path) -> tuple[Path, np.ndarray]:
    mask_path = magnetic_tile / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
    return path, np.asarray(Image.open(mask_path).convert("L")) > 0


def test_corrected_masks_make_served_masks_closer_on_other_defect_images(
    train_normals: list[Path], magnetic_tile: Path, tmp_path: Path
) -> None:
    breaks = sorted((magnetic_tile / "test" / "break").glob("*.jpg"))
    corrected = [_defect_with_mask(p, magnetic_tile) for p in breaks[:12:2]]
    others = [_defect_with_mask(p, magnetic_tile) for p in breaks[1:24:2]]
    normals = sorted((magnetic_tile / "test" / "good").glob("*.jpg"))[:6]
    torch.manual_seed(0)
    model = create_model("patchcore", device="cpu", image_size=128, image_quantile=0.5)
    model.fit(train_normals)

    def mean_dice() -> float:
        predictions = model.predict([p for p, _ in others])
        return float(np.mean([dice_iou(p.mask, m)[0] for p, (_, m) in zip(predictions, others, strict=True)]))

    before = mean_dice()
    info = model.learn_from_corrections(corrected, normals)
    after = mean_dice()
    assert info["n_corrected"] == len(corrected)
    assert info["served"] in ("defect head", "mask rule") and info["rule_dice_on_corrections"] > 0
    assert after > before + 0.05, (before, after, info)
    model.save(tmp_path / "m")
    reloaded = load_model(tmp_path / "m", device="cpu")
    assert (reloaded.defect_head is not None) == (info["served"] == "defect head")
    assert reloaded.calibration.mask_relative == info["mask_relative"]
    first = model.predict([others[0][0]])[0]
    assert np.array_equal(reloaded.predict([others[0][0]])[0].mask, first.mask)
    assert not any(p.mask.any() for p in model.predict(normals) if not p.is_anomalous)


def test_head_is_served_only_when_it_beats_the_tuned_rule_on_images_it_did_not_see() -> None:
    """Corrections whose defect patches are told apart by one feature: the head wins cross-validation."""
    from defect_assist.core.mask_rule import MaskRule
    from defect_assist.core.refinement import Corrections, choose_masks

    rng = np.random.default_rng(0)
    corrections = Corrections([], [], [], [])
    for _ in range(6):
        inputs = torch.from_numpy(rng.normal(size=(3, 8, 8)).astype(np.float32))
        truth = np.zeros((8, 8), bool)
        truth[2:5, 3:6] = True
        inputs[0][torch.from_numpy(truth)] += 6.0  # the defect patches stand out in channel 0
        corrections.inputs.append(inputs)
        corrections.shares.append(torch.from_numpy(truth.astype(np.float32)))
        corrections.truths.append(truth)
        corrections.areas.append((0, 0, 8, 8))
        corrections.mask_maps.append(rng.normal(size=(8, 8)).astype(np.float32))  # a useless map
    learned = choose_masks(corrections, MaskRule(floor=1.0, base=0.0), size=8)
    assert learned.head is not None and learned.head_dice > learned.rule_dice
    corrections.mask_maps = [t.astype(np.float32) * 5 for t in corrections.truths]  # a perfect map
    learned = choose_masks(corrections, MaskRule(floor=1.0, base=0.0), size=8)
    assert learned.head is None and learned.rule_dice == pytest.approx(1.0)


def test_models_without_patch_inputs_refuse_corrections() -> None:
    model = create_model("efficientad", device="cpu")
    with pytest.raises(NotImplementedError):
        model.learn_from_corrections([], [])

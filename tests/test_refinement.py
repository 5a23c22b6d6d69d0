"""Learning from corrected masks: the cut memory and the defect head on PatchCore's patch inputs."""

from __future__ import annotations

import io
from dataclasses import replace
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
    assert info["served"] in ("defect head", "nearest corrected cut", "mask rule")
    assert info["rule_dice_on_corrections"] > 0
    assert after > before + 0.05, (before, after, info)
    model.save(tmp_path / "m")
    reloaded = load_model(tmp_path / "m", device="cpu")
    assert (reloaded.defect_head is not None) == (info["served"] == "defect head")
    assert (reloaded.cut_memory is not None) == (info["served"] == "nearest corrected cut")
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


def _saved(state: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_each_image_takes_the_cut_of_the_corrected_defect_it_resembles() -> None:
    """Two kinds of defect want opposite cuts (a wide diffuse region, a small sharp spot in a halo):
    no single relative cut fits both, the cut memory does, and a new image of either kind gets its
    kind's cut through its descriptor."""
    from defect_assist.core.mask_rule import MaskRule
    from defect_assist.core.refinement import Corrections, CutMemory, choose_masks, defect_descriptors

    rng = np.random.default_rng(0)
    corrections = Corrections([], [], [], [])
    kinds = {}
    for image in range(8):
        kind = "diffuse" if image % 2 else "sharp"
        truth, mask_map = np.zeros((16, 16), bool), np.zeros((16, 16), np.float32)
        if kind == "diffuse":  # the whole region is defect; its centre peaks
            truth[4:12, 4:12], mask_map[4:12, 4:12], mask_map[8, 8] = True, 1.4, 3.0
        else:  # only the spot is defect; the halo around it is merely unusual
            mask_map[5:11, 5:11], mask_map[7:9, 7:9], truth[7:9, 7:9] = 2.0, 3.0, True
        features = torch.from_numpy(rng.normal(scale=0.1, size=(4, 16, 16)).astype(np.float32))
        features[0 if kind == "diffuse" else 1] += 1.0  # what tells the kinds apart
        scores = torch.from_numpy(mask_map)[None]
        inputs = torch.cat([features, scores, scores / 3.0])
        corrections.inputs.append(inputs)
        corrections.shares.append(torch.from_numpy(truth.astype(np.float32)))
        corrections.truths.append(truth)
        corrections.areas.append((0, 0, 16, 16))
        corrections.mask_maps.append(mask_map)
        corrections.descriptors.append(defect_descriptors(inputs[None])[0])
        kinds[image] = kind
    rule = MaskRule(floor=1.0, base=0.0)
    learned = choose_masks(corrections, rule, size=16)
    assert learned.cuts is not None and learned.served == "nearest corrected cut"
    assert learned.cuts_dice == pytest.approx(1.0) and learned.rule_dice < 0.8
    new = torch.stack([corrections.inputs[1], corrections.inputs[0]])  # a diffuse and a sharp defect
    diffuse_cut, sharp_cut = learned.cuts.relatives_for(defect_descriptors(new))
    assert diffuse_cut < 0.5 <= sharp_cut
    saved = CutMemory.from_state(torch.load(_saved(learned.cuts.state()), weights_only=True))
    assert saved.relatives_for(defect_descriptors(new)) == [diffuse_cut, sharp_cut]
    for image, cut in ((1, diffuse_cut), (0, sharp_cut)):
        served = replace(rule, relative=cut).apply(corrections.mask_maps[image], True)
        assert np.array_equal(served, corrections.truths[image]), kinds[image]


def test_models_without_patch_inputs_refuse_corrections() -> None:
    model = create_model("efficientad", device="cpu")
    with pytest.raises(NotImplementedError):
        model.learn_from_corrections([], [])

"""The served-mask rule: cut relative to the image's peak, only on an anomalous verdict."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from defect_assist.core.calibration import Calibration
from defect_assist.core.mask_rule import MaskRule

pytestmark = pytest.mark.unit


def blob(value: float, centre: tuple[int, int], radius: int, size: int = 64) -> np.ndarray:
    """A cone of height ``value`` (1 at the centre, falling to 0 at ``radius``)."""
    yy, xx = np.mgrid[:size, :size]
    distance = np.hypot(yy - centre[0], xx - centre[1])
    return (value * np.clip(1 - distance / radius, 0, None)).astype(np.float32)


def test_normal_verdict_gets_no_mask_however_high_the_map() -> None:
    rule = MaskRule(floor=1.0, base=0.1)
    assert not rule.apply(blob(5.0, (20, 20), 10), anomalous=False).any()


def test_region_is_cut_at_a_share_of_the_peak_above_the_floor() -> None:
    rule = MaskRule(floor=1.0, base=0.0, relative=0.5)
    # a cone of height 3 on radius 20: the cut is at 1 + 0.5 * (3 - 1) = 2, i.e. distance < 20/3
    mask = rule.apply(blob(3.0, (32, 32), 20), anomalous=True)
    yy, xx = np.mgrid[:64, :64]
    expected = 3.0 * (1 - np.hypot(yy - 32, xx - 32) / 20) > 2.0
    assert np.array_equal(mask, expected)
    assert rule.level(3.0) == pytest.approx(2.0)


def test_a_strong_defect_is_not_drawn_wider_than_it_is() -> None:
    """A blurred disk (how a defect looks in the map): a fixed threshold draws the strong one 2x too wide."""
    yy, xx = np.mgrid[:64, :64]
    disk = (np.hypot(yy - 32, xx - 32) < 8).astype(np.float32)
    blurred = ndimage.gaussian_filter(disk, 3)
    rule = MaskRule(floor=0.5, base=0.0, relative=0.5)
    for height in (1.0, 8.0):
        mask = rule.apply(height * blurred, anomalous=True)
        assert 0.4 * disk.sum() <= mask.sum() <= 1.1 * disk.sum()
        assert disk[mask].all()  # inside the defect
    assert (8.0 * blurred > 0.5).sum() > 2 * disk.sum()


def test_anomalous_verdict_below_the_floor_gets_the_region_around_its_peak() -> None:
    rule = MaskRule(floor=10.0, base=0.0)
    anomaly_map = blob(2.0, (10, 10), 6) + blob(1.5, (50, 50), 6)
    mask = rule.apply(anomaly_map, anomalous=True)
    assert mask[10, 10] and not mask[50, 50]  # only the component holding the maximum
    assert mask.sum() > 1


def test_calibration_derives_the_rule_from_normal_mask_maps_and_old_models_have_none() -> None:
    rng = np.random.default_rng(0)
    maps, mask_maps = rng.normal(0, 1, 100_000), rng.normal(5, 2, 100_000)
    calibration = Calibration.from_normals(
        rng.normal(size=50), maps, mask_maps=mask_maps, mask_quantile=0.99, mask_relative=0.4
    )
    rule = calibration.mask_rule()
    assert rule is not None
    assert rule.floor == pytest.approx(np.quantile(mask_maps, 0.99))
    assert rule.base == pytest.approx(np.median(mask_maps))
    assert rule.relative == 0.4
    assert Calibration(pixel_threshold=1.0).mask_rule() is None

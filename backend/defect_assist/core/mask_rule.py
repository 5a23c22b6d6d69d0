"""The served defect mask: which pixels of an image's mask map an annotator is shown as defect.

One rule for every model (thresholds from held-out *normal* images only; chosen on the validation
half of magnetic-tile ``test/``, docs/experiments/served-masks.md):

* a mask only on an *anomalous* verdict, so the verdict and the mask never disagree;
* the region is cut relative to the image's own peak: pixels above
  ``floor + relative · (peak − floor)``, ``floor`` the calibrated mask threshold (a high quantile of
  normal mask-map values) and ``peak`` the image's maximum. A fixed threshold draws a faint blowhole
  as nothing and a strong break as a blob much larger than the break; cut at a share of the peak,
  both keep their shape;
* an anomalous verdict whose map stays below ``floor`` still gets the region around its peak (above
  ``base + ½ (peak − base)``, ``base`` the median normal value): the verdict says *something* is
  there, and the most anomalous place is the best guess of where.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class MaskRule:
    """Calibrated levels of one model's mask map, and the share of the peak that cuts the region."""

    floor: float  # mask-map value above which a pixel is unusual for a normal image
    base: float  # median mask-map value of normal images
    relative: float = 0.5

    def level(self, peak: float) -> float:
        """The cut for an image whose mask map peaks at ``peak``."""
        if peak > self.floor:
            return self.floor + self.relative * (peak - self.floor)
        return self.base + 0.5 * (peak - self.base)

    def apply(self, mask_map: np.ndarray, anomalous: bool) -> np.ndarray:
        """The served ``HxW`` bool mask of one image (empty on a normal verdict)."""
        if not anomalous or mask_map.size == 0:
            return np.zeros(mask_map.shape, bool)
        peak = float(mask_map.max())
        mask = mask_map > self.level(peak)
        if peak > self.floor:
            return mask
        return peak_region(mask_map, mask)


def peak_region(mask_map: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The connected part of ``mask`` that holds the map's maximum (the whole peak if ``mask`` misses it)."""
    labels, _ = ndimage.label(mask)
    peak = labels[np.unravel_index(int(np.argmax(mask_map)), mask_map.shape)]
    if not peak:
        out = np.zeros(mask_map.shape, bool)
        out[np.unravel_index(int(np.argmax(mask_map)), mask_map.shape)] = True
        return out
    return labels == peak

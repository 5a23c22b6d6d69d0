"""The bounding boxes of the mask's outer contours written to a RectangleLabels tag."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from defect_assist.label_studio.control_models.base import ContourControlModel, Region


class RectangleModel(ContourControlModel):
    """One box per contour (pixel-inclusive bounds), in percent of the image size."""

    tag: ClassVar[str] = "RectangleLabels"
    result_type: ClassVar[str] = "rectanglelabels"

    def contour_region(self, contour: np.ndarray, shape: tuple[int, ...], score: float) -> Region:
        height, width = shape
        xs, ys = contour[:, 0].astype(float), contour[:, 1].astype(float)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        value = {
            "x": 100.0 * x0 / width,
            "y": 100.0 * y0 / height,
            "width": 100.0 * (x1 - x0) / width,
            "height": 100.0 * (y1 - y0) / height,
            "rotation": 0,
        }
        return self.region(shape, score, value)

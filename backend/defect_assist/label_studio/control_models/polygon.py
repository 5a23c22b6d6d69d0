"""The mask's outer contours written to a PolygonLabels tag."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from defect_assist.label_studio.control_models.base import ContourControlModel, Region


class PolygonModel(ContourControlModel):
    """One closed polygon per contour, points in percent of the image size (3 decimals)."""

    tag: ClassVar[str] = "PolygonLabels"
    result_type: ClassVar[str] = "polygonlabels"

    def contour_region(self, contour: np.ndarray, shape: tuple[int, ...], score: float) -> Region:
        height, width = shape
        xs, ys = contour[:, 0].astype(float), contour[:, 1].astype(float)
        points = [
            [round(100.0 * x / width, 3), round(100.0 * y / height, 3)] for x, y in zip(xs, ys, strict=True)
        ]
        return self.region(shape, score, {"points": points, "closed": True})

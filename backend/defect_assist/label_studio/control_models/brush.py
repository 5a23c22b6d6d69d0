"""The defect mask written to a BrushLabels tag as Label Studio RLE."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from defect_assist.label_studio.control_models.base import ControlModel, Region
from defect_assist.label_studio.masks import mask_to_rle

if TYPE_CHECKING:
    from defect_assist.core.models.prediction import Prediction


class BrushModel(ControlModel):
    """One brush region holding the whole mask."""

    tag: ClassVar[str] = "BrushLabels"
    result_type: ClassVar[str] = "brushlabels"

    def predict_regions(self, prediction: Prediction) -> list[Region]:
        mask = self.drawn_mask(prediction)
        if mask is None:
            return []
        value = {"format": "rle", "rle": mask_to_rle(mask)}
        return [self.region(mask.shape, float(prediction.score), value)]

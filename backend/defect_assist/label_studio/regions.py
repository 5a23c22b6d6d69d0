"""Label Studio result regions of a prediction, from the control models of a :class:`ControlSpec`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from defect_assist.label_studio.control_models import ChoicesModel, ContourControlModel, Region
from defect_assist.label_studio.label_config import ControlSpec
from defect_assist.label_studio.masks import mask_contours, mask_to_rle, rle_to_mask

if TYPE_CHECKING:
    from defect_assist.core.models.prediction import Prediction

__all__ = ["mask_contours", "mask_to_rle", "prediction_regions", "rle_to_mask"]


def prediction_regions(prediction: Prediction, spec: ControlSpec) -> list[Region]:
    """Label Studio result regions for one prediction: the verdict choice first, then each model's.

    The contours are found once and each contour's polygon and rectangle follow one another.
    """
    models = sorted(spec.models, key=lambda model: not isinstance(model, ChoicesModel))  # stable
    regions: list[Region] = []
    for model in models:
        if not isinstance(model, ContourControlModel):
            regions += model.predict_regions(prediction)
    outlines = [model for model in models if isinstance(model, ContourControlModel)]
    mask = ContourControlModel.drawn_mask(prediction)
    if outlines and mask is not None:
        score = float(prediction.score)
        for contour in mask_contours(mask):
            regions += [model.contour_region(contour, mask.shape, score) for model in outlines]
    return regions

"""The common base of the control models: one control tag of a labeling config, filled on one Image tag."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from defect_assist.label_studio.masks import mask_contours
from defect_assist.label_studio.vocabulary import pick_defect_label

if TYPE_CHECKING:
    from label_studio_sdk.label_interface.control_tags import ControlTag

    from defect_assist.core.models.prediction import Prediction

Region = dict[str, Any]  # one Label Studio result region


@dataclass(frozen=True)
class ControlModel:
    """Fills the control ``from_name`` on the Image tag ``to_name``, drawing ``label`` (when set)."""

    tag: ClassVar[str]  # the control tag handled: "BrushLabels"
    result_type: ClassVar[str]  # the Label Studio result type written: "brushlabels"

    from_name: str
    to_name: str
    label: str | None = None

    @classmethod
    def is_control_matched(cls, control: ControlTag) -> bool:
        """Whether this model can fill ``control``."""
        return control.tag == cls.tag

    @classmethod
    def unmatched_warning(cls, control: ControlTag) -> str | None:
        """Why a control of this model's tag is not filled (recorded as a setup warning), else None."""
        return None

    @classmethod
    def create(cls, control: ControlTag, to_name: str) -> ControlModel:
        """The model for a matched ``control`` on the Image tag ``to_name``; draws its defect label."""
        return cls(from_name=control.name, to_name=to_name, label=pick_defect_label(control.labels))

    def predict_regions(self, prediction: Prediction) -> list[Region]:
        """This control's result regions for one prediction."""
        raise NotImplementedError

    @staticmethod
    def mask_of(prediction: Prediction) -> np.ndarray | None:
        """The prediction's HxW bool mask; None when it failed or has none."""
        if prediction.error is not None or prediction.mask is None:
            return None
        return np.asarray(prediction.mask, dtype=bool)

    @classmethod
    def drawn_mask(cls, prediction: Prediction) -> np.ndarray | None:
        """The mask when it has a defect pixel, else None (nothing to draw)."""
        mask = cls.mask_of(prediction)
        return mask if mask is not None and mask.any() else None

    def region(self, shape: tuple[int, ...], score: float, value: dict[str, Any]) -> Region:
        """A drawn region on the image of ``shape`` (HxW, the original size); adds this model's label."""
        height, width = shape
        return {
            "to_name": self.to_name,
            "original_width": int(width),
            "original_height": int(height),
            "image_rotation": 0,
            "from_name": self.from_name,
            "type": self.result_type,
            "score": score,
            "value": {**value, self.result_type: [self.label] if self.label else []},
        }


class ContourControlModel(ControlModel):
    """A control drawn as one region per outer contour of the mask (polygons, rectangles)."""

    def predict_regions(self, prediction: Prediction) -> list[Region]:
        mask = self.drawn_mask(prediction)
        if mask is None:
            return []
        score = float(prediction.score)
        return [self.contour_region(contour, mask.shape, score) for contour in mask_contours(mask)]

    def contour_region(self, contour: np.ndarray, shape: tuple[int, ...], score: float) -> Region:
        """The region of one ``N x 2`` x,y contour on the image of ``shape``."""
        raise NotImplementedError

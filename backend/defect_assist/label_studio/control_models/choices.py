"""The normal/anomalous verdict written to a Choices tag."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from defect_assist.label_studio.control_models.base import ControlModel, Region
from defect_assist.label_studio.vocabulary import ANOMALOUS_CHOICES, NORMAL_CHOICES, match_choice

if TYPE_CHECKING:
    from label_studio_sdk.label_interface.control_tags import ControlTag

    from defect_assist.core.models.prediction import Prediction


def _pair(control: ControlTag) -> tuple[str, str] | None:
    """The control's (normal, anomalous) choices in the shared vocabulary, when it has both."""
    labels = list(control.labels or [])
    normal, anomalous = match_choice(labels, NORMAL_CHOICES), match_choice(labels, ANOMALOUS_CHOICES)
    return (normal, anomalous) if normal and anomalous else None


@dataclass(frozen=True)
class ChoicesModel(ControlModel):
    """Chooses ``anomalous_choice`` or ``normal_choice`` after the prediction's verdict."""

    tag: ClassVar[str] = "Choices"
    result_type: ClassVar[str] = "choices"

    normal_choice: str = ""
    anomalous_choice: str = ""

    @classmethod
    def is_control_matched(cls, control: ControlTag) -> bool:
        return super().is_control_matched(control) and _pair(control) is not None

    @classmethod
    def unmatched_warning(cls, control: ControlTag) -> str | None:
        if control.tag != cls.tag or cls.is_control_matched(control):
            return None
        labels = list(control.labels or [])
        return f"Choices {control.name!r} has no normal/anomalous pair among {labels}; verdict not filled"

    @classmethod
    def create(cls, control: ControlTag, to_name: str) -> ChoicesModel:
        pair = _pair(control)
        if pair is None:
            raise ValueError(cls.unmatched_warning(control))
        return cls(from_name=control.name, to_name=to_name, normal_choice=pair[0], anomalous_choice=pair[1])

    def predict_regions(self, prediction: Prediction) -> list[Region]:
        if self.mask_of(prediction) is None:
            return []
        choice = self.anomalous_choice if prediction.is_anomalous else self.normal_choice
        return [
            {
                "from_name": self.from_name,
                "to_name": self.to_name,
                "type": self.result_type,
                "value": {"choices": [choice]},
                "score": float(prediction.score),
            }
        ]

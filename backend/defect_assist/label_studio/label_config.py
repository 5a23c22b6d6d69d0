"""Which tags of a labeling config this backend fills (:class:`ControlSpec`, read with the SDK)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

# imported here, not on the first /setup: Label Studio gives /setup 3 s and the SDK takes seconds to load
from label_studio_sdk.label_interface import LabelInterface

from defect_assist.label_studio.control_models import (
    CONTROL_MODELS,
    BrushModel,
    ChoicesModel,
    ControlModel,
    PolygonModel,
    RectangleModel,
)

if TYPE_CHECKING:
    from label_studio_sdk.label_interface.control_tags import ControlTag


class LabelConfigError(ValueError):
    """The labeling config has nothing this backend can fill."""


def _model_field(model_class: type[ControlModel], attribute: str) -> property:
    """A read-only attribute of the spec's ``model_class`` model (None without one)."""
    return property(lambda spec: getattr(spec.model(model_class), attribute, None))


@dataclass
class ControlSpec:
    """The Image tag predicted on, its task data key, and the control models that fill tags on it."""

    image: str  # Image tag name (to_name)
    image_key: str  # task data key holding the URL ($image → image)
    models: list[ControlModel] = field(default_factory=list)  # in CONTROL_MODELS order
    warnings: list[str] = field(default_factory=list)

    # The names and labels of the filled tags, as read before the control models.
    brush = _model_field(BrushModel, "from_name")
    brush_label = _model_field(BrushModel, "label")
    choices = _model_field(ChoicesModel, "from_name")
    normal_choice = _model_field(ChoicesModel, "normal_choice")
    anomalous_choice = _model_field(ChoicesModel, "anomalous_choice")
    polygon = _model_field(PolygonModel, "from_name")
    polygon_label = _model_field(PolygonModel, "label")
    rectangle = _model_field(RectangleModel, "from_name")
    rectangle_label = _model_field(RectangleModel, "label")

    @property
    def fills(self) -> list[str]:
        """Names of the filled control tags."""
        return [model.from_name for model in self.models]

    def model(self, model_class: type[ControlModel]) -> ControlModel | None:
        """The model of ``model_class`` among the spec's, if any."""
        return next((model for model in self.models if isinstance(model, model_class)), None)

    @classmethod
    def from_config(cls, config: str) -> ControlSpec:
        """Read a labeling config; raises :class:`LabelConfigError` when nothing can be filled.

        The Image tag with the most kinds of controls pointing at it is chosen; of each kind, the
        first control is filled when a control model matches it.
        """
        if not config or not config.strip():
            raise LabelConfigError("empty labeling config")
        try:
            interface = LabelInterface(config)
        except Exception as error:  # the SDK raises several parse error types
            raise LabelConfigError(f"cannot parse labeling config: {error}") from error
        images = [o for o in interface.objects if o.tag == "Image"]
        if not images:
            raise LabelConfigError("labeling config has no <Image> tag; this backend predicts on images")
        by_image: dict[str, dict[str, ControlTag]] = {image.name: {} for image in images}
        for control in interface.controls:
            for target in control.to_name or []:
                if target in by_image:
                    by_image[target].setdefault(control.tag, control)
        image = max(images, key=lambda o: len(by_image[o.name]))
        controls = by_image[image.name]
        value = str(image.value or "")
        spec = cls(image=image.name, image_key=value.lstrip("$") or image.name)
        for model_class in CONTROL_MODELS:
            control = controls.get(model_class.tag)
            if control is None:
                continue
            if model_class.is_control_matched(control):
                spec.models.append(model_class.create(control, image.name))
            elif warning := model_class.unmatched_warning(control):
                spec.warnings.append(warning)
        if not spec.models:
            raise LabelConfigError(
                "labeling config has no BrushLabels, PolygonLabels, RectangleLabels or normal/anomalous "
                f"Choices on <Image name={image.name!r}>; nothing to pre-annotate"
            )
        return spec

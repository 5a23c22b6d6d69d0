"""Which tags of a labeling config this backend fills (:class:`ControlSpec`, read with the SDK)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from defect_assist.label_studio.vocabulary import (
    ANOMALOUS_CHOICES,
    NORMAL_CHOICES,
    match_choice,
    pick_defect_label,
)


class LabelConfigError(ValueError):
    """The labeling config has nothing this backend can fill."""


@dataclass
class ControlSpec:
    """The tags of a labeling config this backend fills, all pointing at one Image tag."""

    image: str  # Image tag name (to_name)
    image_key: str  # task data key holding the URL ($image → image)
    brush: str | None = None
    brush_label: str | None = None
    choices: str | None = None
    normal_choice: str | None = None
    anomalous_choice: str | None = None
    polygon: str | None = None
    polygon_label: str | None = None
    rectangle: str | None = None
    rectangle_label: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def fills(self) -> list[str]:
        return [name for name in (self.brush, self.choices, self.polygon, self.rectangle) if name]

    @classmethod
    def from_config(cls, config: str) -> ControlSpec:
        """Read a labeling config; raises :class:`LabelConfigError` when nothing can be filled."""
        from label_studio_sdk.label_interface import LabelInterface

        if not config or not config.strip():
            raise LabelConfigError("empty labeling config")
        try:
            interface = LabelInterface(config)
        except Exception as error:  # the SDK raises several parse error types
            raise LabelConfigError(f"cannot parse labeling config: {error}") from error
        images = [o for o in interface.objects if o.tag == "Image"]
        if not images:
            raise LabelConfigError("labeling config has no <Image> tag; this backend predicts on images")
        by_image: dict[str, dict[str, Any]] = {image.name: {} for image in images}
        for control in interface.controls:
            for target in control.to_name or []:
                if target in by_image:
                    by_image[target].setdefault(control.tag, control)
        image = max(images, key=lambda o: len(by_image[o.name]))
        controls = by_image[image.name]
        value = str(image.value or "")
        spec = cls(image=image.name, image_key=value.lstrip("$") or image.name)
        if "BrushLabels" in controls:
            spec.brush = controls["BrushLabels"].name
            spec.brush_label = pick_defect_label(controls["BrushLabels"].labels)
        if "PolygonLabels" in controls:
            spec.polygon = controls["PolygonLabels"].name
            spec.polygon_label = pick_defect_label(controls["PolygonLabels"].labels)
        if "RectangleLabels" in controls:
            spec.rectangle = controls["RectangleLabels"].name
            spec.rectangle_label = pick_defect_label(controls["RectangleLabels"].labels)
        if "Choices" in controls:
            labels = list(controls["Choices"].labels or [])
            normal = match_choice(labels, NORMAL_CHOICES)
            anomalous = match_choice(labels, ANOMALOUS_CHOICES)
            if normal and anomalous:
                spec.choices, spec.normal_choice, spec.anomalous_choice = (
                    controls["Choices"].name,
                    normal,
                    anomalous,
                )
            else:
                spec.warnings.append(
                    f"Choices {controls['Choices'].name!r} has no normal/anomalous pair among {labels}; "
                    "verdict not filled"
                )
        if not spec.fills:
            raise LabelConfigError(
                "labeling config has no BrushLabels, PolygonLabels, RectangleLabels or normal/anomalous "
                f"Choices on <Image name={image.name!r}>; nothing to pre-annotate"
            )
        return spec

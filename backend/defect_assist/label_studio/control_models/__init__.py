"""One model per control tag this backend fills, after label-studio-ml-backend's ``control_models``.

Each class decides with ``is_control_matched(control)`` whether it handles a control of the labeling
config and answers that control's result regions with ``predict_regions(prediction)``.
"""

from defect_assist.label_studio.control_models.base import ContourControlModel, ControlModel, Region
from defect_assist.label_studio.control_models.brush import BrushModel
from defect_assist.label_studio.control_models.choices import ChoicesModel
from defect_assist.label_studio.control_models.polygon import PolygonModel
from defect_assist.label_studio.control_models.rectangle import RectangleModel

# In the order a ControlSpec lists what it fills.
CONTROL_MODELS: tuple[type[ControlModel], ...] = (BrushModel, ChoicesModel, PolygonModel, RectangleModel)

__all__ = [
    "CONTROL_MODELS",
    "BrushModel",
    "ChoicesModel",
    "ContourControlModel",
    "ControlModel",
    "PolygonModel",
    "RectangleModel",
    "Region",
]

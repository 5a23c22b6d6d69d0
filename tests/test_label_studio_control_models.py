"""defect_assist.label_studio.control_models: which control each model fills and the regions it draws."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from defect_assist.core.models.prediction import Prediction
from defect_assist.label_studio.control_models import (
    CONTROL_MODELS,
    BrushModel,
    ChoicesModel,
    ControlModel,
    PolygonModel,
    RectangleModel,
)
from defect_assist.label_studio.label_config import ControlSpec, LabelConfigError
from defect_assist.label_studio.regions import prediction_regions

pytestmark = pytest.mark.unit

VERDICT = "<Choices name='verdict' toName='img'><Choice value='Pass'/><Choice value='NG'/></Choices>"
KIND = "<Choices name='kind' toName='img'><Choice value='cat'/><Choice value='dog'/></Choices>"
CONFIG = (
    f"<View><Image name='img' value='$image'/>{VERDICT}{KIND}"
    "<BrushLabels name='paint' toName='img'><Label value='dust'/><Label value='Defect'/></BrushLabels>"
    "<PolygonLabels name='outline' toName='img'><Label value='scratch'/></PolygonLabels>"
    "<RectangleLabels name='box' toName='img'><Label value='damage'/></RectangleLabels>"
    "<TextArea name='note' toName='img'/></View>"
)


def _controls() -> dict[str, object]:
    return {control.name: control for control in LabelInterface(CONFIG).controls}


def _prediction() -> Prediction:
    mask = np.zeros((40, 50), bool)
    mask[5:15, 5:20] = True
    mask[25:35, 30:45] = True
    return Prediction(source="x", score=0.75, raw_score=1.0, is_anomalous=True, mask=mask)


def test_each_control_is_matched_by_one_model_at_most() -> None:
    matched = {
        name: [cls.__name__ for cls in CONTROL_MODELS if cls.is_control_matched(control)]
        for name, control in _controls().items()
    }
    assert matched == {
        "verdict": ["ChoicesModel"],
        "kind": [],  # no normal/anomalous pair
        "paint": ["BrushModel"],
        "outline": ["PolygonModel"],
        "box": ["RectangleModel"],
        "note": [],
    }


def test_unmatched_choices_explain_themselves() -> None:
    controls = _controls()
    assert ChoicesModel.unmatched_warning(controls["kind"]) == (
        "Choices 'kind' has no normal/anomalous pair among ['cat', 'dog']; verdict not filled"
    )
    assert ChoicesModel.unmatched_warning(controls["verdict"]) is None
    assert all(cls.unmatched_warning(controls["note"]) is None for cls in CONTROL_MODELS)
    with pytest.raises(ValueError, match="no normal/anomalous pair"):
        ChoicesModel.create(controls["kind"], "img")


def test_create_reads_names_and_labels() -> None:
    controls = _controls()
    assert ChoicesModel.create(controls["verdict"], "img") == ChoicesModel(
        "verdict", "img", normal_choice="Pass", anomalous_choice="NG"
    )
    assert BrushModel.create(controls["paint"], "img") == BrushModel("paint", "img", "Defect")
    assert PolygonModel.create(controls["outline"], "img").label == "scratch"  # no defect word: the first
    assert RectangleModel.create(controls["box"], "img").label == "damage"


def test_spec_holds_the_models_in_fill_order() -> None:
    spec = ControlSpec.from_config(CONFIG)
    assert [type(model) for model in spec.models] == [BrushModel, ChoicesModel, PolygonModel, RectangleModel]
    assert spec.fills == ["paint", "verdict", "outline", "box"] and spec.warnings == []
    assert spec.model(BrushModel) == BrushModel("paint", "img", "Defect")
    kind_first = ControlSpec.from_config(CONFIG.replace(VERDICT + KIND, KIND + VERDICT))
    assert kind_first.fills == ["paint", "outline", "box"]  # only the first Choices of the image is read
    assert kind_first.choices is None and kind_first.model(ChoicesModel) is None
    assert kind_first.warnings == [
        "Choices 'kind' has no normal/anomalous pair among ['cat', 'dog']; verdict not filled"
    ]


def test_models_predict_their_own_regions() -> None:
    spec = ControlSpec.from_config(CONFIG)
    prediction = _prediction()
    regions = prediction_regions(prediction, spec)
    assert [r["type"] for r in regions] == ["choices", "brushlabels"] + [
        "polygonlabels",
        "rectanglelabels",
    ] * 2
    for model in spec.models:
        own = model.predict_regions(prediction)
        assert own == [r for r in regions if r["from_name"] == model.from_name] and own
    assert regions[0]["value"] == {"choices": ["NG"]}
    boxes = [r["value"] for r in regions if r["type"] == "rectanglelabels"]
    assert sorted((b["x"], b["y"], b["width"], b["height"]) for b in boxes) == [
        (10.0, 12.5, 30.0, 25.0),
        (60.0, 62.5, 30.0, 25.0),
    ]
    assert all(b["rectanglelabels"] == ["damage"] for b in boxes)


@pytest.mark.parametrize("model_class", [BrushModel, PolygonModel, RectangleModel])
def test_no_label_no_mask_no_region(model_class: type[ControlModel]) -> None:
    model = model_class("name", "img")  # a control without labels
    (region, *_) = model.predict_regions(_prediction())
    assert region["value"][model.result_type] == []
    assert region["original_width"] == 50 and region["original_height"] == 40
    empty = Prediction(source="x", score=0.9, is_anomalous=True, mask=np.zeros((4, 4), bool))
    assert model.predict_regions(empty) == []
    assert model.predict_regions(Prediction(source="x", error="broken")) == []


def test_choices_need_a_readable_image_not_a_drawn_mask() -> None:
    model = ChoicesModel("verdict", "img", normal_choice="OK", anomalous_choice="NG")
    normal = Prediction(source="x", score=0.2, mask=np.zeros((4, 4), bool))
    assert model.predict_regions(normal)[0]["value"] == {"choices": ["OK"]}
    assert model.predict_regions(Prediction(source="x", error="broken")) == []


def test_nothing_to_fill_keeps_the_message() -> None:
    with pytest.raises(LabelConfigError, match=r"^labeling config has no BrushLabels.*<Image name='img'>; "):
        ControlSpec.from_config(
            "<View><Image name='img' value='$url'/><Choices name='c' toName='img'><Choice value='cat'/>"
            "<Choice value='dog'/></Choices></View>"
        )

"""defect_assist.label_studio: project ids, label configs, regions and image fetching over real HTTP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from defect_assist.core.models.prediction import Prediction
from defect_assist.label_studio.client import project_id
from defect_assist.label_studio.label_config import ControlSpec, LabelConfigError
from defect_assist.label_studio.regions import mask_to_rle, prediction_regions, rle_to_mask

pytestmark = pytest.mark.unit

CONFIG = (
    Path(__file__).resolve().parents[1] / "backend/defect_assist/label_studio/labeling_config.xml"
).read_text()
TOKEN = "secret-token"


def test_project_id_mapping() -> None:
    assert project_id("3.1716549") == "3"
    assert project_id(12) == "12"
    assert project_id({"id": 7, "title": "x"}) == "7"
    with pytest.raises(ValueError):
        project_id("abc")
    with pytest.raises(ValueError):
        project_id(None)


def test_recommended_config_fills_brush_choices_polygon() -> None:
    spec = ControlSpec.from_config(CONFIG)
    assert (spec.image, spec.image_key) == ("image", "image")
    assert (spec.brush, spec.brush_label) == ("defect_mask", "defect mask")
    assert (spec.choices, spec.normal_choice, spec.anomalous_choice) == ("verdict", "normal", "anomalous")
    assert (spec.polygon, spec.polygon_label) == ("defect_outline", "defect outline")
    assert spec.rectangle is None
    assert spec.warnings == []


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("", "empty"),
        (
            "<View><Text name='t' value='$text'/><Choices name='c' toName='t'><Choice value='a'/>"
            "</Choices></View>",
            "no <Image>",
        ),
        (
            "<View><Image name='img' value='$url'/><Choices name='c' toName='img'><Choice value='cat'/>"
            "<Choice value='dog'/></Choices></View>",
            "nothing to pre-annotate",
        ),
        ("<View><Image name='img' value='$url'", "cannot parse"),
    ],
)
def test_unusable_configs_are_explained(config: str, message: str) -> None:
    with pytest.raises(LabelConfigError, match=message):
        ControlSpec.from_config(config)


def test_rectangles_and_custom_choice_names() -> None:
    spec = ControlSpec.from_config(
        "<View><Image name='img' value='$url'/><Choices name='qc' toName='img'><Choice value='OK'/>"
        "<Choice value='NG'/></Choices><RectangleLabels name='box' toName='img'><Label value='scratch'/>"
        "</RectangleLabels></View>"
    )
    assert (spec.image_key, spec.choices, spec.normal_choice, spec.anomalous_choice) == (
        "url",
        "qc",
        "OK",
        "NG",
    )
    assert (spec.rectangle, spec.rectangle_label, spec.brush) == ("box", "scratch", None)


def _prediction(mask: np.ndarray, score: float) -> Prediction:
    return Prediction(
        source="x",
        score=score,
        raw_score=score,
        is_anomalous=score >= 0.5,
        anomaly_map=mask.astype(np.float32),
        mask=mask,
    )


def test_regions_round_trip_the_mask() -> None:
    mask = np.zeros((60, 90), bool)
    mask[10:30, 20:50] = True
    mask[45:55, 70:80] = True
    assert np.array_equal(rle_to_mask(mask_to_rle(mask), 60, 90), mask)
    rectangle = "<RectangleLabels name='box' toName='image'><Label value='defect'/></RectangleLabels>"
    outer_end = CONFIG.rindex("</View>")  # the config nests Views: add the tag once, in the outer one
    spec = ControlSpec.from_config(CONFIG[:outer_end] + rectangle + CONFIG[outer_end:])
    regions = prediction_regions(_prediction(mask, 0.9), spec)
    by_type: dict[str, list[dict]] = {}
    for region in regions:
        by_type.setdefault(region["type"], []).append(region)
    assert by_type["choices"][0]["value"] == {"choices": ["anomalous"]}
    brush = by_type["brushlabels"][0]
    assert (brush["original_width"], brush["original_height"]) == (90, 60)
    assert brush["value"]["brushlabels"] == ["defect mask"]
    assert np.array_equal(rle_to_mask(brush["value"]["rle"], 60, 90), mask)
    assert len(by_type["polygonlabels"]) == 2 and len(by_type["rectanglelabels"]) == 2
    for polygon in by_type["polygonlabels"]:
        points = np.array(polygon["value"]["points"])
        assert points.shape[1] == 2 and points.min() >= 0 and points.max() <= 100
        assert polygon["value"]["polygonlabels"] == ["defect outline"]
    boxes = sorted(
        (r["value"]["x"], r["value"]["y"], r["value"]["width"], r["value"]["height"])
        for r in by_type["rectanglelabels"]
    )
    assert boxes[0] == pytest.approx((100 * 20 / 90, 100 * 10 / 60, 100 * 30 / 90, 100 * 20 / 60))


def test_normal_prediction_gives_only_the_verdict() -> None:
    regions = prediction_regions(_prediction(np.zeros((8, 8), bool), 0.1), ControlSpec.from_config(CONFIG))
    assert regions == [
        {
            "from_name": "verdict",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": ["normal"]},
            "score": 0.1,
        }
    ]
    failed = Prediction(source="x", error="cannot read image x: broken")
    assert prediction_regions(failed, ControlSpec.from_config(CONFIG)) == []

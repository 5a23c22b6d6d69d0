"""defect_assist.label_studio.regions: specs and regions pinned to the pre-control-model implementation.

The expected values were computed with the single-function ``prediction_regions`` that the control models
replaced; ``sha256`` is over ``json.dumps(regions)`` (key order included), so any change to a region,
its keys or the region order fails here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from defect_assist.core.models.prediction import Prediction
from defect_assist.label_studio.label_config import ControlSpec
from defect_assist.label_studio.regions import prediction_regions

pytestmark = pytest.mark.unit

SHIPPED = (
    Path(__file__).resolve().parents[1] / "backend/defect_assist/label_studio/labeling_config.xml"
).read_text()
# The recommended config as it was when the values were pinned (one "defect" label on both the brush
# and the polygon); the shipped one, laid out in columns with distinct label names, is held to the
# same regions by test_shipped_config_draws_the_pinned_regions_under_its_labels.
RECOMMENDED = """<View>
  <Header value="Defect inspection: check the verdict, correct the mask"/>
  <Image name="image" value="$image" zoom="true" zoomControl="true" brightnessControl="true"
         contrastControl="true"/>
  <Choices name="verdict" toName="image" choice="single" showInline="true" required="true">
    <Choice value="normal" hotkey="1"/>
    <Choice value="anomalous" hotkey="2"/>
  </Choices>
  <BrushLabels name="defect_mask" toName="image">
    <Label value="defect" background="#ff0040"/>
  </BrushLabels>
  <PolygonLabels name="defect_outline" toName="image" strokeWidth="2" opacity="0.3">
    <Label value="defect" background="#ffa000"/>
  </PolygonLabels>
</View>
"""
SHIPPED_LABELS = {"brushlabels": "defect mask", "polygonlabels": "defect outline"}
RECTANGLE = "<RectangleLabels name='box' toName='image'><Label value='defect'/></RectangleLabels>"
CONFIGS: dict[str, str] = {
    "recommended": RECOMMENDED,
    "recommended+rectangle": RECOMMENDED.replace("</View>", RECTANGLE + "</View>"),
    "rectangle+ok/ng": (
        "<View><Image name='img' value='$url'/><Choices name='qc' toName='img'><Choice value='OK'/>"
        "<Choice value='NG'/></Choices><RectangleLabels name='box' toName='img'><Label value='scratch'/>"
        "</RectangleLabels></View>"
    ),
    "polygon+rectangle": (
        "<View><Image name='photo' value='$picture'/>"
        "<PolygonLabels name='outline' toName='photo'><Label value='scratch'/><Label value='Damage'/>"
        "</PolygonLabels><RectangleLabels name='box' toName='photo'><Label value='NG area'/>"
        "<Label value='other'/></RectangleLabels></View>"
    ),
    "brush-only+bad-choices": (
        "<View><Image name='img' value='$image'/><Choices name='kind' toName='img'><Choice value='cat'/>"
        "<Choice value='dog'/></Choices><BrushLabels name='paint' toName='img'><Label value='zone'/>"
        "</BrushLabels><BrushLabels name='paint2' toName='img'><Label value='defect'/></BrushLabels></View>"
    ),
    "two-images": (
        "<View><Image name='left' value='$a'/><Image name='right' value='$b'/>"
        "<Choices name='v' toName='left'><Choice value='Pass'/><Choice value='Fail'/></Choices>"
        "<Choices name='v2' toName='right'><Choice value='No defect'/><Choice value='Defect'/></Choices>"
        "<PolygonLabels name='poly' toName='right'><Label value='defect'/></PolygonLabels></View>"
    ),
    "choices-only": (
        "<View><Image name='img' value='$image'/><Choices name='verdict' toName='img'>"
        "<Choice value='good'/><Choice value='defective'/></Choices></View>"
    ),
}


def _prediction(mask: np.ndarray | None, score: float, anomalous: bool | None = None) -> Prediction:
    return Prediction(
        source="x",
        score=score,
        raw_score=score,
        is_anomalous=score >= 0.5 if anomalous is None else anomalous,
        anomaly_map=None if mask is None else mask.astype(np.float32),
        mask=mask,
    )


def _two_blobs() -> Prediction:
    mask = np.zeros((60, 90), bool)
    mask[10:30, 20:50] = True
    mask[45:55, 70:80] = True
    return _prediction(mask, 0.9)


def _disk_with_specks() -> Prediction:
    """A large disk (contour simplified to <= 200 points), a small square and 1-pixel specks (dropped)."""
    yy, xx = np.mgrid[:320, :400]
    mask = (yy - 160) ** 2 + (xx - 180) ** 2 < 140**2
    mask[5:8, 380:383] = True
    rng = np.random.default_rng(0)
    mask[rng.integers(0, 320, 30), rng.integers(360, 400, 30)] = True
    return _prediction(mask, 0.8125)


PREDICTIONS: dict[str, Callable[[], Prediction]] = {
    "empty-normal": lambda: _prediction(np.zeros((8, 8), bool), 0.1),
    "empty-anomalous": lambda: _prediction(np.zeros((16, 12), bool), 0.7),
    "two-blobs": _two_blobs,
    "disk-with-specks": _disk_with_specks,
    "mask-but-normal": lambda: _prediction(np.pad(np.ones((5, 5), bool), 3), 0.25, anomalous=False),
    "error": lambda: Prediction(source="x", error="cannot read image x: broken"),
    "no-mask": lambda: _prediction(None, 0.6),
}

# ControlSpec.from_config(config) attributes that are set (not None or []), before the refactor.
EXPECTED_SPECS: dict[str, dict[str, object]] = {
    "brush-only+bad-choices": {
        "image": "img",
        "image_key": "image",
        "fills": ["paint"],
        "warnings": ["Choices 'kind' has no normal/anomalous pair among ['cat', 'dog']; verdict not filled"],
        "brush": "paint",
        "brush_label": "zone",
    },
    "choices-only": {
        "image": "img",
        "image_key": "image",
        "fills": ["verdict"],
        "choices": "verdict",
        "normal_choice": "good",
        "anomalous_choice": "defective",
    },
    "polygon+rectangle": {
        "image": "photo",
        "image_key": "picture",
        "fills": ["outline", "box"],
        "polygon": "outline",
        "polygon_label": "Damage",
        "rectangle": "box",
        "rectangle_label": "NG area",
    },
    "recommended": {
        "image": "image",
        "image_key": "image",
        "fills": ["defect_mask", "verdict", "defect_outline"],
        "brush": "defect_mask",
        "brush_label": "defect",
        "choices": "verdict",
        "normal_choice": "normal",
        "anomalous_choice": "anomalous",
        "polygon": "defect_outline",
        "polygon_label": "defect",
    },
    "recommended+rectangle": {
        "image": "image",
        "image_key": "image",
        "fills": ["defect_mask", "verdict", "defect_outline", "box"],
        "brush": "defect_mask",
        "brush_label": "defect",
        "choices": "verdict",
        "normal_choice": "normal",
        "anomalous_choice": "anomalous",
        "polygon": "defect_outline",
        "polygon_label": "defect",
        "rectangle": "box",
        "rectangle_label": "defect",
    },
    "rectangle+ok/ng": {
        "image": "img",
        "image_key": "url",
        "fills": ["qc", "box"],
        "choices": "qc",
        "normal_choice": "OK",
        "anomalous_choice": "NG",
        "rectangle": "box",
        "rectangle_label": "scratch",
    },
    "two-images": {
        "image": "right",
        "image_key": "b",
        "fills": ["v2", "poly"],
        "choices": "v2",
        "normal_choice": "No defect",
        "anomalous_choice": "Defect",
        "polygon": "poly",
        "polygon_label": "defect",
    },
}

# (config, prediction) -> (region types in order: Choices Brush Polygon Rectangle, sha256[:16] of
# json.dumps(regions)), before the refactor; pairs not listed gave no region.
EMPTY_DIGEST = hashlib.sha256(b"[]").hexdigest()[:16]
EXPECTED_REGIONS: dict[tuple[str, str], tuple[str, str]] = {
    ("brush-only+bad-choices", "disk-with-specks"): ("B", "44fd204859205256"),
    ("brush-only+bad-choices", "mask-but-normal"): ("B", "1b8597b39b2b5be4"),
    ("brush-only+bad-choices", "two-blobs"): ("B", "0e9bedc82b2a51fe"),
    ("choices-only", "disk-with-specks"): ("C", "5f9a3cc003716150"),
    ("choices-only", "empty-anomalous"): ("C", "9bd5234d6d1d5f50"),
    ("choices-only", "empty-normal"): ("C", "3f7e5857b8a4159b"),
    ("choices-only", "mask-but-normal"): ("C", "707758d5a9e49a94"),
    ("choices-only", "two-blobs"): ("C", "ca6d9eb12e0e5831"),
    ("polygon+rectangle", "disk-with-specks"): ("PRPR", "4ad45d36963dea0f"),
    ("polygon+rectangle", "mask-but-normal"): ("PR", "10bbafd52b450cbd"),
    ("polygon+rectangle", "two-blobs"): ("PRPR", "7ec4aa542f654f9d"),
    ("recommended", "disk-with-specks"): ("CBPP", "3d2207dfb55605ca"),
    ("recommended", "empty-anomalous"): ("C", "fcd7ba8cfa4cbd96"),
    ("recommended", "empty-normal"): ("C", "ccf325cb3603cc36"),
    ("recommended", "mask-but-normal"): ("CBP", "a69f8032b950eef8"),
    ("recommended", "two-blobs"): ("CBPP", "afb46c2134867af1"),
    ("recommended+rectangle", "disk-with-specks"): ("CBPRPR", "fcd6eaeb58e71946"),
    ("recommended+rectangle", "empty-anomalous"): ("C", "fcd7ba8cfa4cbd96"),
    ("recommended+rectangle", "empty-normal"): ("C", "ccf325cb3603cc36"),
    ("recommended+rectangle", "mask-but-normal"): ("CBPR", "d9102992a52fa118"),
    ("recommended+rectangle", "two-blobs"): ("CBPRPR", "f48f27123e075de8"),
    ("rectangle+ok/ng", "disk-with-specks"): ("CRR", "00234e0d68e8de4f"),
    ("rectangle+ok/ng", "empty-anomalous"): ("C", "920a47b4f1f2bf9b"),
    ("rectangle+ok/ng", "empty-normal"): ("C", "c0cf38cd66adcd2e"),
    ("rectangle+ok/ng", "mask-but-normal"): ("CR", "b45cab9b6d0c5944"),
    ("rectangle+ok/ng", "two-blobs"): ("CRR", "64453d1bd70320fc"),
    ("two-images", "disk-with-specks"): ("CPP", "64ceaafcb34dd6f7"),
    ("two-images", "empty-anomalous"): ("C", "8c554fea6f9d0cc6"),
    ("two-images", "empty-normal"): ("C", "072a64f914fda6a7"),
    ("two-images", "mask-but-normal"): ("CP", "7fc9a9c810cfa6cc"),
    ("two-images", "two-blobs"): ("CPP", "307d1a49f4b9bfd5"),
}

SPEC_FIELDS = [
    "image",
    "image_key",
    "fills",
    "warnings",
    "brush",
    "brush_label",
    "choices",
    "normal_choice",
    "anomalous_choice",
    "polygon",
    "polygon_label",
    "rectangle",
    "rectangle_label",
]
TYPES = {"choices": "C", "brushlabels": "B", "polygonlabels": "P", "rectanglelabels": "R"}


def _set_fields(spec: ControlSpec) -> dict[str, object]:
    fields = {name: getattr(spec, name) for name in SPEC_FIELDS}
    return {name: value for name, value in fields.items() if value not in (None, [])}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_spec_is_unchanged(config: str) -> None:
    assert _set_fields(ControlSpec.from_config(CONFIGS[config])) == EXPECTED_SPECS[config]


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("prediction", sorted(PREDICTIONS))
def test_regions_are_byte_identical(config: str, prediction: str) -> None:
    regions = prediction_regions(PREDICTIONS[prediction](), ControlSpec.from_config(CONFIGS[config]))
    types = "".join(TYPES[region["type"]] for region in regions)
    digest = hashlib.sha256(json.dumps(regions).encode()).hexdigest()[:16]
    assert (types, digest) == EXPECTED_REGIONS.get((config, prediction), ("", EMPTY_DIGEST))


@pytest.mark.parametrize("prediction", sorted(PREDICTIONS))
def test_shipped_config_draws_the_pinned_regions_under_its_labels(prediction: str) -> None:
    """The shipped config fills what the pinned one did; only the brush and polygon label names differ."""
    shipped = ControlSpec.from_config(SHIPPED)
    assert _set_fields(shipped) == {
        **EXPECTED_SPECS["recommended"],
        "brush_label": SHIPPED_LABELS["brushlabels"],
        "polygon_label": SHIPPED_LABELS["polygonlabels"],
    }
    expected = [
        {**region, "value": {**region["value"], region["type"]: [SHIPPED_LABELS[region["type"]]]}}
        if region["type"] in SHIPPED_LABELS
        else region
        for region in prediction_regions(PREDICTIONS[prediction](), ControlSpec.from_config(RECOMMENDED))
    ]
    assert json.dumps(prediction_regions(PREDICTIONS[prediction](), shipped)) == json.dumps(expected)


def test_pinned_values_read_plainly() -> None:
    """A few of the pinned values spelled out: key order, the verdict and the simplified disk outline."""
    regions = prediction_regions(
        _disk_with_specks(), ControlSpec.from_config(CONFIGS["recommended+rectangle"])
    )
    assert list(regions[0]) == ["from_name", "to_name", "type", "value", "score"]
    assert regions[0]["value"] == {"choices": ["anomalous"]} and regions[0]["score"] == 0.8125
    assert list(regions[1]) == [
        "to_name",
        "original_width",
        "original_height",
        "image_rotation",
        "from_name",
        "type",
        "score",
        "value",
    ]
    assert [len(r["value"]["points"]) for r in regions if r["type"] == "polygonlabels"] == [32, 4]
    small = regions[-1]["value"]
    assert (small["x"], small["y"], small["width"], small["height"]) == (95.0, 5 / 320 * 100, 0.75, 0.9375)

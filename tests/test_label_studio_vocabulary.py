"""defect_assist.label_studio.vocabulary: one normal/defect vocabulary for verdicts written and read back."""

from __future__ import annotations

import numpy as np
import pytest

from defect_assist.core.models.prediction import Prediction
from defect_assist.label_studio.annotations import classify_annotation
from defect_assist.label_studio.label_config import ControlSpec
from defect_assist.label_studio.regions import prediction_regions
from defect_assist.label_studio.vocabulary import is_normal_choice, pick_defect_label

pytestmark = pytest.mark.unit


def _choice(value: str) -> list[dict]:
    return [{"from_name": "verdict", "to_name": "image", "type": "choices", "value": {"choices": [value]}}]


@pytest.mark.parametrize("value", ["No defect", "nodefect", "pass", "OK", "normal", " Good "])
def test_normal_words_read_as_normal(value: str) -> None:
    assert is_normal_choice(value)
    assert classify_annotation(_choice(value)) == ("normal", None, 0)


@pytest.mark.parametrize("value", ["Defect", "NG", "anomalous", "Fail", "cat"])
def test_other_words_read_as_anomalous(value: str) -> None:
    assert not is_normal_choice(value)
    assert classify_annotation(_choice(value)) == ("anomalous", None, 0)


@pytest.mark.parametrize(
    ("labels", "picked"),
    [
        (["defect mask"], "defect mask"),  # the recommended config's brush label
        (["scratch", "defect outline"], "defect outline"),  # its polygon label, after a non-defect one
        (["Dust", "NG area"], "NG area"),
        (["scratch", "dust"], "scratch"),  # no defect word: the first
        ([], None),
    ],
)
def test_region_labels_with_a_defect_word_are_drawn(labels: list[str], picked: str | None) -> None:
    assert pick_defect_label(labels) == picked


@pytest.mark.parametrize(
    ("choices", "normal", "anomalous"),
    [
        (["Defect", "No defect"], "No defect", "Defect"),
        (["nodefect", "defective"], "nodefect", "defective"),
        (["PASS", "FAIL", "skip"], "PASS", "FAIL"),
        (["OK", "NG"], "OK", "NG"),
        (["bad", "normal", "anomalous"], "normal", "anomalous"),  # vocabulary order, not config order
    ],
)
def test_spec_picks_choices_with_the_same_vocabulary(choices: list[str], normal: str, anomalous: str) -> None:
    options = "".join(f"<Choice value='{choice}'/>" for choice in choices)
    spec = ControlSpec.from_config(
        f"<View><Image name='image' value='$image'/><Choices name='verdict' toName='image'>{options}"
        "</Choices></View>"
    )
    assert (spec.normal_choice, spec.anomalous_choice) == (normal, anomalous)
    for is_anomalous in (False, True):  # what the backend writes reads back as the same verdict
        prediction = Prediction(source="x", score=0.5, is_anomalous=is_anomalous, mask=np.zeros((4, 4), bool))
        verdict, _, _ = classify_annotation(prediction_regions(prediction, spec))
        assert verdict == ("anomalous" if is_anomalous else "normal")

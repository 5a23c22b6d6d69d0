"""Label Studio review tasks from FiftyOne samples, with our predictions attached.

Uses ``defect_assist.label_studio`` (the project's Label Studio module) when it provides
``create_review_tasks``; otherwise this minimal path with label-studio-sdk: read the project's
labeling config, find its ``Choices`` (verdict) and ``BrushLabels`` (defect mask) controls on the
image, and import one task per sample with a prediction (verdict choice + brush RLE mask,
``model_version``, ``score``). Images are referenced by ``image_url_prefix + file name`` or, by
default, Label Studio's local-files URL ``/data/local-files/?d=<path>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def _controls(label_config: str) -> dict[str, Any]:
    """Names and labels of the verdict (Choices) and mask (BrushLabels) controls and their image."""
    from label_studio_sdk.label_interface import LabelInterface

    interface = LabelInterface(label_config)
    found: dict[str, Any] = {}
    for control in interface.controls:
        tag = control.tag.lower()
        if tag == "choices" and "choices" not in found:
            found["choices"] = (control.name, control.to_name[0], list(control.labels))
        elif tag == "brushlabels" and "brush" not in found:
            found["brush"] = (control.name, control.to_name[0], list(control.labels))
    image = next(iter(interface.objects), None)
    found["image_key"] = image.value.lstrip("$") if image is not None else "image"
    return found


def _pick(labels: list[str], wanted: str) -> str:
    for label in labels:
        if label.lower().startswith(wanted[:4]):
            return label
    return labels[-1 if wanted == "anomalous" else 0]


def prediction_result(sample: Any, controls: dict[str, Any]) -> list[dict[str, Any]]:
    """The Label Studio ``result`` list of one sample's prediction (verdict + brush mask)."""
    from label_studio_sdk.converter.brush import mask2rle

    result: list[dict[str, Any]] = []
    prediction = sample["prediction"] if sample.has_field("prediction") else None
    if prediction is None:
        return result
    if "choices" in controls:
        name, to_name, labels = controls["choices"]
        result.append(
            {
                "from_name": name,
                "to_name": to_name,
                "type": "choices",
                "value": {"choices": [_pick(labels, prediction.label)]},
            }
        )
    mask_label = sample["pred_mask"] if sample.has_field("pred_mask") else None
    if "brush" in controls and mask_label is not None and mask_label.mask_path:
        mask = np.asarray(Image.open(mask_label.mask_path)) > 0
        if mask.any():
            name, to_name, labels = controls["brush"]
            result.append(
                {
                    "from_name": name,
                    "to_name": to_name,
                    "type": "brushlabels",
                    "original_width": int(mask.shape[1]),
                    "original_height": int(mask.shape[0]),
                    "image_rotation": 0,
                    "value": {
                        "format": "rle",
                        "rle": mask2rle((mask * 255).astype(np.uint8)),
                        "brushlabels": [labels[0]],
                    },
                }
            )
    return result


def build_tasks(samples: Any, label_config: str, image_url_prefix: str | None = None) -> list[dict[str, Any]]:
    """Task dicts (data + one prediction each) for ``samples``."""
    controls = _controls(label_config)
    tasks = []
    for sample in samples:
        path = Path(sample.filepath)
        url = (
            f"{image_url_prefix.rstrip('/')}/{path.name}"
            if image_url_prefix
            else f"/data/local-files/?d={str(path).lstrip('/')}"
        )
        score = float(sample["score"]) if sample.has_field("score") and sample["score"] is not None else None
        version = sample["model_version"] if sample.has_field("model_version") else ""
        tasks.append(
            {
                "data": {controls["image_key"]: url, "fiftyone_sample_id": sample.id},
                "predictions": [
                    {
                        "model_version": version or "unknown",
                        "score": score,
                        "result": prediction_result(sample, controls),
                    }
                ],
            }
        )
    return tasks


def create_review_tasks(samples: Any, ls_project: int, image_url_prefix: str | None = None) -> list[int]:
    """Create the tasks in Label Studio project ``ls_project``; returns their task ids."""
    try:
        from defect_assist import label_studio  # the project's Label Studio module, when present

        if hasattr(label_studio, "create_review_tasks"):
            return list(
                label_studio.create_review_tasks(samples, ls_project, image_url_prefix=image_url_prefix)
            )
    except ImportError:
        pass
    from label_studio_sdk import LabelStudio

    from defect_assist.settings import get_settings

    settings = get_settings()
    client = LabelStudio(base_url=settings.label_studio_url, api_key=settings.label_studio_api_key)
    project = client.projects.get(id=ls_project)
    tasks = build_tasks(samples, project.label_config, image_url_prefix)
    response = client.projects.import_tasks(id=ls_project, request=tasks, return_task_ids=True)
    return [int(t) for t in (getattr(response, "task_ids", None) or [])]

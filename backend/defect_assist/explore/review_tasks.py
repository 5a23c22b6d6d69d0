"""Label Studio review tasks from FiftyOne samples, with the samples' predictions attached.

Each sample becomes one task (its image by ``image_url_prefix + file name`` or, by default, Label
Studio's local-files URL ``/data/local-files/?d=<path>``) with one prediction built by the Label
Studio adapter, exactly as the ML backend builds it: the verdict choice, the brush mask and any
polygon/rectangle regions the project's labeling config asks for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from defect_assist.core.models.prediction import Prediction
from defect_assist.core.settings import get_settings
from defect_assist.label_studio.client import LabelStudioClient
from defect_assist.label_studio.label_config import ControlSpec
from defect_assist.label_studio.regions import prediction_regions


def sample_prediction(sample: Any) -> Prediction | None:
    """The sample's stored prediction (score, verdict, mask) as a :class:`Prediction`."""
    verdict = sample["prediction"] if sample.has_field("prediction") else None
    if verdict is None:
        return None
    mask_label = sample["pred_mask"] if sample.has_field("pred_mask") else None
    if mask_label is not None and mask_label.mask_path:
        mask = np.asarray(Image.open(mask_label.mask_path)) > 0
    else:
        with Image.open(sample.filepath) as image:
            mask = np.zeros((image.height, image.width), dtype=bool)
    score = sample["score"] if sample.has_field("score") and sample["score"] is not None else float("nan")
    return Prediction(
        source=sample.filepath, score=float(score), is_anomalous=verdict.label == "anomalous", mask=mask
    )


def build_tasks(samples: Any, label_config: str, image_url_prefix: str | None = None) -> list[dict[str, Any]]:
    """Task dicts (data + one prediction each) for ``samples``."""
    spec = ControlSpec.from_config(label_config)
    tasks = []
    for sample in samples:
        path = Path(sample.filepath)
        url = (
            f"{image_url_prefix.rstrip('/')}/{path.name}"
            if image_url_prefix
            else f"/data/local-files/?d={str(path).lstrip('/')}"
        )
        prediction = sample_prediction(sample)
        score = float(sample["score"]) if sample.has_field("score") and sample["score"] is not None else None
        version = sample["model_version"] if sample.has_field("model_version") else ""
        tasks.append(
            {
                "data": {spec.image_key: url, "fiftyone_sample_id": sample.id},
                "predictions": [
                    {
                        "model_version": version or "unknown",
                        "score": score,
                        "result": prediction_regions(prediction, spec) if prediction else [],
                    }
                ],
            }
        )
    return tasks


def create_review_tasks(samples: Any, ls_project: int, image_url_prefix: str | None = None) -> list[int]:
    """Create the tasks in Label Studio project ``ls_project``; returns their task ids."""
    with LabelStudioClient.from_settings(get_settings()) as client:
        label_config = client.project(ls_project)["label_config"]
        return client.import_tasks(ls_project, build_tasks(samples, label_config, image_url_prefix))

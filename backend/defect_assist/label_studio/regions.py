"""Label Studio result regions of a prediction: brush RLE, the verdict choice, polygons and rectangles."""

from __future__ import annotations

from typing import Any

import numpy as np

from defect_assist.label_studio.label_config import ControlSpec


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE of a boolean HxW mask."""
    from label_studio_sdk.converter.brush import mask2rle

    return mask2rle(np.asarray(mask, dtype=bool).astype(np.uint8) * 255)


def rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Boolean HxW mask of a Label Studio brush RLE."""
    from label_studio_sdk.converter.brush import decode_rle

    return decode_rle(rle).reshape(height, width, 4)[:, :, 3] > 0


def mask_contours(mask: np.ndarray, min_area: int = 4, max_points: int = 200) -> list[np.ndarray]:
    """Outer contours (``N x 2`` x,y pixel arrays) of the mask's regions, simplified."""
    import cv2

    contours, _ = cv2.findContours(np.asarray(mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    found = []
    for contour in contours:
        if cv2.contourArea(contour) < min_area:
            continue
        epsilon = 0.5
        simplified = contour
        while len(simplified) > max_points:
            epsilon *= 2
            simplified = cv2.approxPolyDP(contour, epsilon, True)
        if len(simplified) >= 3:
            found.append(simplified.reshape(-1, 2))
    return found


def prediction_regions(prediction: Any, spec: ControlSpec) -> list[dict[str, Any]]:
    """Label Studio result regions for one :class:`~defect_assist.core.models.Prediction`."""
    if prediction.error is not None or prediction.mask is None:
        return []
    mask = np.asarray(prediction.mask, dtype=bool)
    height, width = mask.shape
    score = float(prediction.score)
    common = {
        "to_name": spec.image,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
    }
    regions: list[dict[str, Any]] = []
    if spec.choices:
        choice = spec.anomalous_choice if prediction.is_anomalous else spec.normal_choice
        regions.append(
            {
                "from_name": spec.choices,
                "to_name": spec.image,
                "type": "choices",
                "value": {"choices": [choice]},
                "score": score,
            }
        )
    if not mask.any():
        return regions
    if spec.brush:
        regions.append(
            {
                **common,
                "from_name": spec.brush,
                "type": "brushlabels",
                "score": score,
                "value": {
                    "format": "rle",
                    "rle": mask_to_rle(mask),
                    "brushlabels": [spec.brush_label] if spec.brush_label else [],
                },
            }
        )
    if spec.polygon or spec.rectangle:
        for contour in mask_contours(mask):
            xs, ys = contour[:, 0].astype(float), contour[:, 1].astype(float)
            if spec.polygon:
                points = [
                    [round(100.0 * x / width, 3), round(100.0 * y / height, 3)]
                    for x, y in zip(xs, ys, strict=True)
                ]
                regions.append(
                    {
                        **common,
                        "from_name": spec.polygon,
                        "type": "polygonlabels",
                        "score": score,
                        "value": {
                            "points": points,
                            "closed": True,
                            "polygonlabels": [spec.polygon_label] if spec.polygon_label else [],
                        },
                    }
                )
            if spec.rectangle:
                x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                regions.append(
                    {
                        **common,
                        "from_name": spec.rectangle,
                        "type": "rectanglelabels",
                        "score": score,
                        "value": {
                            "x": 100.0 * x0 / width,
                            "y": 100.0 * y0 / height,
                            "width": 100.0 * (x1 - x0) / width,
                            "height": 100.0 * (y1 - y0) / height,
                            "rotation": 0,
                            "rectanglelabels": [spec.rectangle_label] if spec.rectangle_label else [],
                        },
                    }
                )
    return regions

"""Mask conversions for Label Studio: brush RLE both ways and simplified outer contours."""

from __future__ import annotations

import numpy as np


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

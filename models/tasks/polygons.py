"""Instance polygons ↔ masks (OpenCV), in the JSONL/response convention: fractions of the image."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw


def polygons_to_mask(polygons: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
    """Rasterise normalised polygon segments into a uint8 {0, 1} mask of shape (height, width)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for segment in polygons:
        points = [(segment[i] * width, segment[i + 1] * height) for i in range(0, len(segment), 2)]
        draw.polygon(points, fill=1, outline=1)
    return np.asarray(canvas, dtype=np.uint8)


def _simplify(contour: np.ndarray, max_points: int) -> np.ndarray:
    """Douglas-Peucker with a growing tolerance until the contour has at most `max_points`."""
    if len(contour) <= max_points:
        return contour
    perimeter = cv2.arcLength(contour, closed=True)
    epsilon = 0.002 * perimeter
    simplified = contour
    while len(simplified) > max_points:
        simplified = cv2.approxPolyDP(contour, epsilon, closed=True)
        epsilon *= 1.5
    return simplified


def mask_to_polygons(mask: np.ndarray, max_points: int, *, min_area: float = 1.0) -> list[list[float]]:
    """Outer contours of a binary mask as normalised [x1, y1, x2, y2, ...] segments, largest first."""
    height, width = mask.shape
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contours = [c for c in contours if len(c) >= 3 and cv2.contourArea(c) >= min_area]
    contours.sort(key=cv2.contourArea, reverse=True)
    segments = []
    for contour in contours:
        points = _simplify(contour, max_points).reshape(-1, 2).astype(np.float64)
        if len(points) < 3:
            continue
        points[:, 0] /= width
        points[:, 1] /= height
        segments.append([round(float(v), 6) for v in np.clip(points, 0.0, 1.0).reshape(-1)])
    return segments

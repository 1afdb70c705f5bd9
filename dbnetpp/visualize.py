"""Drawing detections on images (OpenCV, BGR)."""

from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = ["draw_detections"]

Color = Tuple[int, int, int]


def draw_detections(
    image: np.ndarray,
    polygons: Sequence[np.ndarray],
    scores: Optional[Sequence[float]] = None,
    color: Color = (0, 255, 0),
    thickness: Optional[int] = None,
) -> np.ndarray:
    """A copy of ``image`` (BGR uint8 (H, W, 3)) with every polygon outlined and its score written
    above its top-most point.

    Args:
        polygons: each (K, 2) (or (2K,)) of (x, y) pixels of ``image``.
        scores: one per polygon, or None for outlines only.
        color: BGR outline colour.
        thickness: line width in pixels; default grows with the image size (1 px per 600 px).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a BGR uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    if scores is not None and len(scores) != len(polygons):
        raise ValueError(f"{len(polygons)} polygons but {len(scores)} scores")
    canvas = image.copy()
    if len(polygons) == 0:
        return canvas
    height, width = canvas.shape[:2]
    if thickness is None:
        thickness = max(1, round(max(height, width) / 600))
    points = [np.round(np.asarray(p, dtype=np.float64).reshape(-1, 1, 2)).astype(np.int32) for p in polygons]
    cv2.polylines(canvas, points, isClosed=True, color=color, thickness=thickness, lineType=cv2.LINE_AA)
    if scores is None:
        return canvas

    font, font_scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness
    for pts, score in zip(points, scores):
        label = f"{float(score):.2f}"
        (text_w, text_h), baseline = cv2.getTextSize(label, font, font_scale, thickness)
        top = pts[np.argmin(pts[:, 0, 1]), 0]
        # label box above the top-most vertex, kept inside the image
        x = int(np.clip(top[0], 0, max(0, width - text_w)))
        y = int(np.clip(top[1] - thickness, text_h + baseline, height - 1))
        cv2.rectangle(canvas, (x, y - text_h - baseline), (x + text_w, y), color, cv2.FILLED)
        cv2.putText(canvas, label, (x, y - baseline), font, font_scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return canvas

"""Robust Reading Competition submission files (ICDAR 2015 task 4.1).

One ``res_<image stem>.txt`` per image, one quadrilateral per line::

    x1,y1,x2,y2,x3,y3,x4,y4

integer pixels of the original image, clockwise as seen on screen (y grows
downwards), starting at the corner nearest the top-left. The official
server takes a zip of these files at its top level.
"""

import os
import zipfile
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np


def to_clockwise_quad(polygon: Any) -> np.ndarray:
    """An integer (4, 2) clockwise quadrilateral for a (K, 2) / (2K,) polygon.

    A polygon with other than 4 points is replaced by its minimum-area
    rectangle. The corners are put in clockwise order on screen (sorted by
    angle around their centroid, y down; this also untangles a crossed
    "bow-tie" order), rounded to integers, and rotated to start at the corner
    with the smallest x + y.
    """
    points = np.asarray(polygon, dtype=np.float64)
    if points.size < 6 or points.size % 2 != 0:
        raise ValueError(f"need a polygon of at least 3 (x, y) points, got an array of shape {points.shape}")
    points = points.reshape(-1, 2)
    if not np.all(np.isfinite(points)):
        raise ValueError(f"polygon has non-finite coordinates: {points.tolist()}")
    if len(points) != 4:
        points = cv2.boxPoints(cv2.minAreaRect(points.astype(np.float32))).astype(np.float64)
    center = points.mean(axis=0)
    angles = np.arctan2(points[:, 1] - center[1], points[:, 0] - center[0])
    quad = np.rint(points[np.argsort(angles, kind="stable")]).astype(np.int64)
    x, y = quad[:, 0], quad[:, 1]
    twice_area = np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)
    if twice_area < 0:
        quad = quad[::-1]
    start = int(np.argmin(quad.sum(axis=1)))
    return np.roll(quad, -start, axis=0)


def result_file_name(image: str) -> str:
    """``img_12.jpg`` or ``/data/test/img_12.jpg`` -> ``res_img_12.txt``."""
    stem = Path(str(image)).stem
    if not stem:
        raise ValueError(f"cannot derive a result file name from image name {image!r}")
    return f"res_{stem}.txt"


def format_lines(polygons: Sequence[Any], scores: Optional[Sequence[float]] = None) -> List[str]:
    """Submission lines for one image; with ``scores``, each line ends with ``,score``."""
    if scores is not None and len(scores) != len(polygons):
        raise ValueError(f"{len(polygons)} polygons but {len(scores)} scores")
    lines = []
    for i, polygon in enumerate(polygons):
        try:
            quad = to_clockwise_quad(polygon)
        except ValueError as err:
            raise ValueError(f"polygon {i}: {err}") from None
        line = ",".join(str(int(v)) for v in quad.reshape(-1))
        if scores is not None:
            line += f",{float(scores[i]):.6f}"
        lines.append(line)
    return lines


def format_scored_line(polygon: Any, score: float) -> str:
    """``x1,y1,...,xK,yK,score`` with the exact values (shortest round-trip decimal of each
    float), points clockwise on screen. ``dbnetpp eval --predictions`` reads it back to the
    same polygon (float32) and score, so the H-mean's score-threshold sweep is reproduced;
    the official server wants ``format_lines`` instead (integers)."""
    points = np.asarray(polygon, dtype=np.float32).reshape(-1, 2)
    if len(points) < 3 or not np.all(np.isfinite(points)):
        raise ValueError(f"need a polygon of at least 3 finite (x, y) points, got {points.tolist()}")
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    if np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) < 0:  # counter-clockwise on screen (y down)
        points = points[::-1]
    score = float(score)
    if not np.isfinite(score):
        raise ValueError(f"score must be finite, got {score}")
    return ",".join(repr(float(v)) for v in points.reshape(-1)) + f",{score!r}"


def write_submission(
    out_dir: str,
    results: Mapping[str, Tuple[Sequence[Any], Sequence[float]]],
    *,
    with_scores: bool = False,
    zip_name: Optional[str] = None,
) -> List[str]:
    """Write one result file per image, and optionally zip them.

    Args:
        out_dir: output folder (created).
        results: image name or path (``img_N.jpg``) -> (polygons, scores);
            polygons in original-image pixels, each (K, 2) or (2K,).
        with_scores: append each detection's score as a ninth field.
        zip_name: if given (e.g. ``"submit.zip"``), also write this zip in
            ``out_dir`` with every result file at its top level, ready for
            the official server.

    Returns:
        the paths written: the text files, then the zip (if any).
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    names = set()
    for image, (polygons, scores) in results.items():
        name = result_file_name(image)
        if name in names:
            raise ValueError(f"two images map to the same result file {name} (last one: {image!r})")
        names.add(name)
        try:
            lines = format_lines(polygons, scores if with_scores else None)
        except ValueError as err:
            raise ValueError(f"{image}: {err}") from None
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(line + "\n" for line in lines))
        paths.append(path)
    if zip_name is not None:
        zip_path = os.path.join(out_dir, zip_name)
        with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in paths:
                zf.write(path, arcname=os.path.basename(path))
        paths.append(zip_path)
    return paths

"""Small polygon helpers shared by target generation and post-processing.

Polygons are (K, 2) arrays of (x, y) points in pixels.
"""

import math

import numpy as np
import pyclipper

_EMPTY = np.zeros((0, 2), dtype=np.float32)


def offset_polygon(points: np.ndarray, distance: float) -> np.ndarray:
    """Grow (``distance > 0``) or shrink (``distance < 0``) a polygon with round joins.

    The Vatti offset of pyclipper, called the way MMOCR's ``offset_polygon`` calls
    it, quirks included:

    - pyclipper works on integers: each input coordinate is truncated toward zero
      (as for the numpy scalars MMOCR hands over; 1.7 -> 1, -1.7 -> -1);
    - no resulting path -> empty;
    - several paths with *different* vertex counts (the polygon split) -> empty;
    - several paths with equal vertex counts -> the first one.

    Args:
        points: (K, 2) or (2K,) polygon, pixels.
        distance: offset in pixels.

    Returns:
        (M, 2) float32 polygon, or an empty (0, 2) array when there is no usable result.
    """
    points = np.asarray(points)
    if points.size == 0 or points.size % 2 != 0:
        return _EMPTY.copy()
    # Python numbers convert to pyclipper's integers exactly as numpy scalars do, faster.
    coords = points.reshape(-1, 2).tolist()
    distance = float(distance)
    # the sum is NaN/inf iff some coordinate is (or the values are beyond any use)
    if not (math.isfinite(distance) and math.isfinite(sum(x + y for x, y in coords))):
        return _EMPTY.copy()
    offset = pyclipper.PyclipperOffset()
    try:
        offset.AddPath(coords, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
        paths = offset.Execute(distance)
    except (pyclipper.ClipperException, OverflowError, TypeError, ValueError):
        return _EMPTY.copy()
    if len(paths) == 0:
        return _EMPTY.copy()
    first = len(paths[0])
    if any(len(path) != first for path in paths[1:]):
        return _EMPTY.copy()
    # float32 as in MMOCR: integer results round-trip exactly below 2**24 pixels.
    return np.asarray(paths[0], dtype=np.float32).reshape(-1, 2)

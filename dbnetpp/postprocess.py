"""DB post-processing: probability map -> text polygons (MMOCR v1.0.1's
``DBPostprocessor``, same candidates in the same order with the same numbers).

For one (H, W) probability map:

1. binarise ``prob > mask_thr`` and trace every contour
   (``cv2.findContours``, RETR_LIST, CHAIN_APPROX_SIMPLE); candidates after
   index ``max_candidates`` are not looked at;
2. simplify each contour with ``cv2.approxPolyDP`` (epsilon =
   ``epsilon_ratio`` x its perimeter); fewer than 4 points -> skipped;
3. score = mean probability inside the simplified polygon (filled into its
   integer bounding box); below ``min_text_score`` -> skipped;
4. unclip: offset the polygon outwards by ``area * unclip_ratio / perimeter``
   with pyclipper (round joins); an empty result -> skipped;
5. 'quad': the minimum-area rotated rectangle of the unclipped polygon, kept
   when its shorter side is at least ``min_text_width``; 'poly': the unclipped
   polygon itself (at least 4 points).

Faster than MMOCR for the same output: the map is thresholded once without
extra copies, the score box comes from ``cv2.boundingRect`` (the contour points
are integers inside the map, so MMOCR's floor / ceil / clip change nothing),
and the area and perimeter are computed without shapely, giving GEOS's floats
exactly on integer points (exact shoelace sum; edge lengths added in ring
order). Scores are rounded to float32, as MMOCR returns them in a FloatTensor.

Hostile maps (MMOCR does neither): a non-finite probability is read as 0 (NaN, -inf)
or 1 (+inf) before binarisation and scoring, so every score and point is finite; and
a map whose text mask has more than ``MAX_CONTOURS`` regions and holes (a cheap upper
bound, counted before any contour is built) is not a text map: it gives no polygons
and a warning, instead of gigabytes of contours that ``max_candidates`` would cut.
"""

import math
import numbers
import warnings
from typing import Any, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from .polygon import offset_polygon

TEXT_REPR_TYPES = ("quad", "poly")
# Upper bound on the contours of one map (regions plus holes of its text mask); past it the map
# gives no polygons. A real text map has tens to hundreds; uniform noise on a 1024x1824 map ~300,000
# (findContours: ~0.5 s, 200 MB); a 4000x4000 checkerboard 8 million (12 s, 5.7 GB).
MAX_CONTOURS = 500_000
MAX_UNCLIP_RATIO = 100.0  # far above any recipe (1.5 to 2): past it the offset swallows the map


def area_and_perimeter(points: np.ndarray) -> Tuple[float, float]:
    """Area (|shoelace|) and perimeter (closed ring) of an integer polygon (K, 2).

    Equal to shapely's ``Polygon(points).area`` and ``.length`` to the last
    bit: the area is an exact integer sum, and the edge lengths are added in
    ring order starting at point 0, as GEOS does.
    """
    pts = points.tolist()
    x0, y0 = pts[0]
    twice_area = 0
    perimeter = 0.0
    for x1, y1 in pts[1:] + pts[:1]:
        twice_area += x0 * y1 - x1 * y0
        dx = x1 - x0
        dy = y1 - y0
        perimeter += math.sqrt(dx * dx + dy * dy)
        x0, y0 = x1, y1
    return abs(twice_area) / 2.0, perimeter


class DBPostProcessor:
    """Turns one DB probability map into text polygons and scores.

    Args:
        text_repr_type: 'quad' (rotated rectangles, 4 points) or 'poly'
            (unclipped polygons).
        mask_thr: binarisation threshold on the probability map.
        min_text_score: minimum mean probability inside a candidate.
        min_text_width: minimum shorter side of a 'quad' box, in map pixels.
        unclip_ratio: unclip distance = area * unclip_ratio / perimeter.
        epsilon_ratio: ``approxPolyDP`` tolerance as a fraction of the contour
            perimeter.
        max_candidates: contours with an index above this are ignored.

    ``pp(prob_map, scale=None) -> (polygons, scores)``: ``prob_map`` is an
    (H, W) float numpy array or torch tensor (any device); ``polygons`` is a
    list of float32 (K, 2) arrays of (x, y) map pixels, divided by
    ``scale = (sx, sy)`` when given (the test resize factors, so the points
    land in original-image pixels); ``scores`` is a list of floats (rounded to
    float32, like MMOCR's score tensor).
    """

    def __init__(
        self,
        text_repr_type: str = "quad",
        mask_thr: float = 0.3,
        min_text_score: float = 0.3,
        min_text_width: float = 5,
        unclip_ratio: float = 1.5,
        epsilon_ratio: float = 0.002,
        max_candidates: int = 3000,
    ) -> None:
        if text_repr_type not in TEXT_REPR_TYPES:
            raise ValueError(f"text_repr_type must be one of {TEXT_REPR_TYPES}, got {text_repr_type!r}")
        if not isinstance(max_candidates, numbers.Integral) or isinstance(max_candidates, bool) or max_candidates < 0:
            raise ValueError(f"max_candidates must be an integer >= 0, got {max_candidates!r}")
        _check_number("mask_thr", mask_thr)
        _check_number("min_text_score", min_text_score)
        _check_number("min_text_width", min_text_width, low=0.0)
        _check_number("unclip_ratio", unclip_ratio, low=0.0, high=MAX_UNCLIP_RATIO)
        _check_number("epsilon_ratio", epsilon_ratio, low=0.0, high=1.0)
        self.text_repr_type = text_repr_type
        self.mask_thr = mask_thr
        self.min_text_score = min_text_score
        self.min_text_width = min_text_width
        self.unclip_ratio = unclip_ratio
        self.epsilon_ratio = epsilon_ratio
        self.max_candidates = int(max_candidates)

    def extra_repr(self) -> str:
        return (
            f"text_repr_type={self.text_repr_type!r}, mask_thr={self.mask_thr}, "
            f"min_text_score={self.min_text_score}, min_text_width={self.min_text_width}, "
            f"unclip_ratio={self.unclip_ratio}, epsilon_ratio={self.epsilon_ratio}, "
            f"max_candidates={self.max_candidates}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def __call__(
        self, prob_map: Any, scale: Optional[Sequence[float]] = None
    ) -> Tuple[List[np.ndarray], List[float]]:
        score_map, text_mask = self._binarize(prob_map)
        inv_scale = None
        if scale is not None:
            inv_scale = _inverse_scale(scale)

        bound = contour_bound(text_mask, MAX_CONTOURS)
        if bound > MAX_CONTOURS:
            warnings.warn(
                f"DBPostProcessor: the text mask has up to {bound} regions and holes, more than "
                f"MAX_CONTOURS={MAX_CONTOURS}: not a text probability map, no polygons returned",
                stacklevel=2,
            )
            return [], []
        contours, _ = cv2.findContours(text_mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        polygons: List[np.ndarray] = []
        scores: List[float] = []
        quad = self.text_repr_type == "quad"
        for i, contour in enumerate(contours):
            if i > self.max_candidates:
                break
            if len(contour) < 4:  # approxPolyDP only removes points
                continue
            approx = cv2.approxPolyDP(contour, self.epsilon_ratio * cv2.arcLength(contour, True), True)
            if approx.shape[0] < 4:
                continue
            points = approx.reshape(-1, 2)
            score = region_score(score_map, points)
            if score < self.min_text_score:
                continue
            area, perimeter = area_and_perimeter(points)
            distance = area * self.unclip_ratio / perimeter
            expanded = offset_polygon(points, distance)
            if len(expanded) == 0:
                continue
            expanded = np.asarray(expanded, dtype=np.float32).reshape(-1, 2)
            if quad:
                rect = cv2.minAreaRect(expanded)
                if min(rect[1]) < self.min_text_width:
                    continue
                polygon = cv2.boxPoints(rect)
            else:
                polygon = expanded
            if polygon.shape[0] < 4:
                continue
            if inv_scale is not None:
                polygon = (polygon * inv_scale).astype(np.float32)
            if not (math.isfinite(score) and np.isfinite(polygon).all()):
                continue  # cannot happen on a finite map and scale: a guard, not a policy
            polygons.append(polygon)
            scores.append(float(np.float32(score)))
        return polygons, scores

    def _binarize(self, prob_map: Any) -> Tuple[np.ndarray, np.ndarray]:
        """(float32 score map, uint8 0/1 text mask), both (H, W) numpy. The
        comparison runs in the map's own dtype (and device), like MMOCR; a map
        with non-finite values is first made finite (NaN, -inf -> 0, +inf -> 1)."""
        if isinstance(prob_map, torch.Tensor):
            if prob_map.dim() != 2:
                raise ValueError(f"DBPostProcessor: prob_map must be (H, W), got shape {tuple(prob_map.shape)}")
            if not prob_map.is_floating_point():
                raise TypeError(f"DBPostProcessor: prob_map must be floating point, got {prob_map.dtype}")
            prob_map = prob_map.detach()
            if prob_map.device.type != "cpu" or prob_map.dtype != torch.float32:
                if not bool(torch.isfinite(prob_map).all()):
                    prob_map = torch.nan_to_num(prob_map.float(), nan=0.0, posinf=1.0, neginf=0.0)
                text_mask = (prob_map > self.mask_thr).to(torch.uint8).cpu().numpy()
                return prob_map.float().cpu().numpy(), text_mask
            prob_map = prob_map.numpy()
        prob_map = np.asarray(prob_map)
        if prob_map.ndim != 2:
            raise ValueError(f"DBPostProcessor: prob_map must be (H, W), got shape {prob_map.shape}")
        if not np.issubdtype(prob_map.dtype, np.floating):
            raise TypeError(f"DBPostProcessor: prob_map must be floating point, got {prob_map.dtype}")
        if prob_map.size and not (np.isfinite(prob_map.min()) and np.isfinite(prob_map.max())):  # NaN propagates
            prob_map = np.nan_to_num(prob_map, nan=0.0, posinf=1.0, neginf=0.0)
        # a python float compares in the array's dtype (NEP 50), like torch
        text_mask = np.greater(prob_map, self.mask_thr).view(np.uint8)
        score_map = np.ascontiguousarray(prob_map, dtype=np.float32)  # no copy when already so
        return score_map, text_mask


def contour_bound(text_mask: np.ndarray, limit: int = 0) -> int:
    """Upper bound on the contours ``cv2.findContours(RETR_LIST)`` finds in a 0/1 mask, in
    O(H x W) without building any: each 8-connected region has a top-left pixel with no region
    pixel above, left, above-left or above-right of it, and each 4-connected hole a top-left
    pixel with region pixels above and left of it; both kinds are counted.

    A cheaper bound is tried first: each region holds a horizontal run of mask pixels and each hole
    a run of background between two of them, so twice the number of runs bounds both (~1 ms on a
    1024x1824 map); the tighter count runs only when that one is past ``limit``."""
    runs = int(np.count_nonzero(text_mask[:, 1:] > text_mask[:, :-1])) + int(np.count_nonzero(text_mask[:, :1]))
    if 2 * runs <= limit:
        return 2 * runs
    m = np.pad(text_mask.astype(bool, copy=False), ((1, 0), (1, 1)))
    here, up, left = m[1:, 1:-1], m[:-1, 1:-1], m[1:, :-2]
    starts = here & ~up & ~left & ~m[:-1, :-2] & ~m[:-1, 2:]
    holes = ~here & up & left
    return int(np.count_nonzero(starts)) + int(np.count_nonzero(holes))


def _check_number(name: str, value: Any, low: float = -math.inf, high: float = math.inf) -> None:
    """ValueError naming ``name`` unless ``value`` is a real number, finite, in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")


def region_score(score_map: np.ndarray, points: np.ndarray) -> float:
    """Mean of ``score_map`` over the pixels of the filled integer polygon
    ``points`` (K, 2), computed inside the polygon's bounding box."""
    x, y, w, h = cv2.boundingRect(points)
    mask = np.zeros((h, w), dtype=np.uint8)
    cv2.fillPoly(mask, [points], 1, offset=(-x, -y))
    return cv2.mean(score_map[y : y + h, x : x + w], mask)[0]


def _inverse_scale(scale: Sequence[float]) -> np.ndarray:
    s = np.asarray(_to_list(scale), dtype=np.float64).reshape(-1)
    if s.shape != (2,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"DBPostProcessor: scale must be two positive numbers (sx, sy), got {scale!r}")
    return (1.0 / s)[None, :]


def _to_list(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().tolist()
    return x

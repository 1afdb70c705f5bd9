"""DB training targets: shrunk text kernels, their mask, the threshold map and its mask.

A re-implementation of MMOCR 1.0.1's ``DBModuleLoss`` target generation
(``_is_poly_invalid``, ``_generate_kernels``, ``_generate_effective_mask``,
``_generate_thr_map``) that produces the same float32 maps bit for bit, faster:
the distances of a polygon are computed for all its edges in one numpy pass over
its window, or, for large polygons, edge by edge only on the box around each edge
where that edge can matter; the last steps run once per image over all windows.

Numerics that matter for bit-exact maps (kept as MMOCR has them):

- polygons are float32; the shrink works on the polygon truncated to int32,
  the threshold map on the float polygon; areas and perimeters come from shapely;
- the shrink distance is ``int(A * (1 - r**2) / (L + 0.001) + 0.5)``, the
  expansion distance ``A * (1 - r**2) / L`` (no rounding);
- pyclipper truncates float coordinates to integers (see :func:`offset_polygon`);
- in the point-to-edge distance the squared edge length ``c2`` is computed in
  float32 from float32 vertices (as numpy does for numpy float32 scalars) and
  everything per pixel in float64; the "perpendicular distance" can be NaN for
  pixels on an edge when float32 rounding makes ``|cos| > 1``: such a pixel
  leaves the threshold map unchanged, exactly as in MMOCR (``np.fmax``).

Deliberate differences, all outside what MMOCR's pipeline feeds it: a polygon whose
grown box lies fully right of or below the canvas is skipped (MMOCR skips only the
left/top case and otherwise writes a wrong row/column or fails); degenerate input
(fewer than 3 points, NaN/inf or coordinates beyond 2**24 px) is ignored instead of
raising deep inside shapely/OpenCV.
"""

from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
import shapely

from ..polygon import offset_polygon

_EPS32 = float(np.finfo(np.float32).eps)  # exactly 2**-23
_CAPSULE_MARGIN = 2.0  # pixels added around each edge's D-neighbourhood (rounding headroom)
_CALL_COST = 2000  # numpy call overhead, in float64 elements: picks per-edge boxes or one window
# Larger coordinates (NaN, inf, beyond 2**24 px where float32 stops holding integers and
# int32 casts overflow) make a polygon unusable: it is ignored and not drawn at all.
_MAX_COORD = float(2**24)


def db_targets(
    polygons: Sequence[np.ndarray],
    ignore: Sequence[bool],
    height: int,
    width: int,
    *,
    shrink_ratio: float = 0.4,
    thr_min: float = 0.3,
    thr_max: float = 0.7,
    min_short_size: float = 8,
) -> Dict[str, np.ndarray]:
    """Target maps of one image, as MMOCR's DBModuleLoss builds them.

    Args:
        polygons: n polygons, each (K, 2) or (2K,) (x, y) in pixels (cast to float32).
        ignore: (n,) bool, True for "do not care" regions (``###``).
        height, width: size of the maps in pixels (the padded network input).
        shrink_ratio: r; kernels are shrunk and borders grown by ``A (1 - r^2) / L``.
        thr_min, thr_max: range the threshold map is mapped to.
        min_short_size: polygons whose minimum-area rectangle has a shorter side
            below this (pixels) are ignored, like those of area < 1 and those whose
            shrink fails. Ignored polygons zero ``shrink_mask`` (their int32-truncated
            outline) and take no part in the other maps. Polygons with fewer than 3
            points are ignored too; those with NaN/inf or |coordinate| >= 2**24 are
            ignored and not drawn at all.

    Returns:
        dict of float32 (height, width) arrays: ``shrink_map`` (1 inside shrunk
        kernels), ``shrink_mask`` (0 inside ignored polygons, 1 elsewhere),
        ``thr_map`` (in [thr_min, thr_max]), ``thr_mask`` (1 inside grown polygons).
    """
    polys, ignored = _check_inputs(polygons, ignore, height, width)
    if not thr_min <= thr_max:
        raise ValueError(f"thr_min must not exceed thr_max, got {thr_min} > {thr_max}")
    height, width = int(height), int(width)

    # 1. invalid polygons join the ignored ones. shapely gives area and perimeter of the
    # float polygons (validity, grow distance) and of their int32 truncation (shrink).
    usable = _usable(polys)
    for i, poly in enumerate(polys):
        if len(poly) < 3 or not usable[i]:
            ignored[i] = True
    care = np.flatnonzero(~ignored).tolist()
    int_polys = [polys[i].astype(np.int32) for i in care]
    area, length = _area_length([polys[i] for i in care] + int_polys)
    float_area, float_length = area[: len(care)], length[: len(care)]
    int_area, int_length = area[len(care) :], length[len(care) :]
    for k, i in enumerate(care):
        if abs(float_area[k]) < 1 or min(cv2.minAreaRect(polys[i])[1]) < min_short_size:
            ignored[i] = True

    # One block for the four maps: one large allocation is reused by the allocator from
    # call to call, where four separate ones tend to go back to the OS and fault in again.
    maps = np.empty((4, height, width), dtype=np.float32)
    shrink_map, shrink_mask, thr_map, thr_mask = maps

    # 2. shrunk kernels, on the int32-truncated polygons; a failed shrink means ignored
    shrink_map.fill(0)
    shrink_factor = 1 - shrink_ratio * shrink_ratio
    for k, i in enumerate(care):
        if ignored[i]:
            continue
        distance = int(int_area[k] * shrink_factor / (int_length[k] + 0.001) + 0.5)
        shrunk = offset_polygon(int_polys[k], -distance)
        if len(shrunk) == 0:
            ignored[i] = True
            continue
        cv2.fillPoly(shrink_map, [shrunk.astype(np.int32)], 1.0)

    # 3. effective mask: every ignored polygon (original coordinates) zeroed
    shrink_mask.fill(1)
    for i in np.flatnonzero(ignored & usable).tolist():
        if len(polys[i]) > 0:
            cv2.fillPoly(shrink_mask, [polys[i].astype(np.int32)], 0.0)

    # 4. threshold map from the polygons still cared for. The canvas is kept already mapped
    # to [thr_min, thr_max]: the affine map is monotone (also after float32 rounding), so
    # max-then-map equals MMOCR's map-after-max and the background needs no extra pass.
    thr_scale, thr_min = float(thr_max - thr_min), float(thr_min)
    thr_map.fill(thr_min)
    thr_mask.fill(0)
    kept = [k for k, i in enumerate(care) if not ignored[i]]
    grow = float_area[kept] * (1 - np.power(shrink_ratio, 2)) / float_length[kept]
    _draw_borders(thr_map, thr_mask, [polys[care[k]] for k in kept], grow, thr_scale, thr_min)

    return {"shrink_map": shrink_map, "shrink_mask": shrink_mask, "thr_map": thr_map, "thr_mask": thr_mask}


def _check_inputs(
    polygons: Sequence[np.ndarray], ignore: Sequence[bool], height: int, width: int
) -> Tuple[List[np.ndarray], np.ndarray]:
    if int(height) != height or int(width) != width or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive integers, got {height!r} x {width!r}")
    polys = []
    for i, poly in enumerate(polygons):
        if (
            type(poly) is np.ndarray
            and poly.dtype == np.float32
            and poly.ndim == 2
            and poly.shape[1] == 2
            and poly.flags.c_contiguous
        ):
            polys.append(poly)  # the usual case; only read, never written
            continue
        try:
            arr = np.asarray(poly, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise ValueError(f"polygon {i} is not numeric: {err}") from None
        if arr.size % 2 != 0:
            raise ValueError(f"polygon {i} has shape {arr.shape}: expected (K, 2) or (2K,) coordinates")
        polys.append(np.ascontiguousarray(arr.reshape(-1, 2)))
    ignored = np.array(ignore, dtype=bool).reshape(-1)
    if len(ignored) != len(polys):
        raise ValueError(f"got {len(polys)} polygons but {len(ignored)} ignore flags")
    return polys, ignored


def _usable(polys: List[np.ndarray]) -> np.ndarray:
    """(n,) bool: every coordinate is finite and below _MAX_COORD in magnitude (one pass when all are)."""
    if not polys or (np.abs(np.concatenate(polys)) < _MAX_COORD).all():
        return np.ones(len(polys), dtype=bool)
    return np.array([bool((np.abs(p) < _MAX_COORD).all()) for p in polys], dtype=bool)


def _area_length(polys: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """shapely area and perimeter (float64) of each polygon (>= 3 points each)."""
    if not polys:
        return np.zeros(0), np.zeros(0)
    if all(len(p) == len(polys[0]) for p in polys):
        geoms = shapely.polygons(np.stack(polys).astype(np.float64))
        return shapely.area(geoms), shapely.length(geoms)
    area, length = np.zeros(len(polys)), np.zeros(len(polys))  # 0: ignored as too small
    for i, poly in enumerate(polys):
        try:
            geom = shapely.Polygon(poly)
        except (ValueError, shapely.errors.GEOSException):
            continue
        area[i], length[i] = geom.area, geom.length
    return area, length


def _draw_borders(
    thr_map: np.ndarray,
    thr_mask: np.ndarray,
    polygons: List[np.ndarray],
    distances: np.ndarray,
    thr_scale: float,
    thr_min: float,
) -> None:
    """Draw the polygons' borders into the (already mapped) threshold map and its mask.

    ``polygons``: float32 (K, 2) each; ``distances``: their grow distances D, pixels.
    Per polygon the window is the grown polygon's box clipped to the canvas; the squared
    distances of all windows share one flat buffer, so the last steps run once per image.
    """
    height, width = thr_map.shape
    jobs = []  # (polygon, D, x_min, y_min, x0, y0, x1, y1): grown box origin, window in canvas
    for polygon, distance in zip(polygons, distances.tolist()):
        grown = offset_polygon(polygon, distance)
        grown = polygon.astype(np.int32) if len(grown) == 0 else grown.astype(np.int32)
        xs, ys = grown.T.tolist()
        x_min, x_max, y_min, y_max = min(xs), max(xs), min(ys), max(ys)
        # MMOCR only tests the left/top side; a box fully right of or below the canvas
        # is skipped here too (MMOCR would index a wrong column there or fail).
        if x_max < 0 or y_max < 0 or x_min > width - 1 or y_min > height - 1:
            continue
        cv2.fillPoly(thr_mask, [grown], 1.0)
        x0, y0, x1, y1 = max(x_min, 0), max(y_min, 0), min(x_max, width - 1), min(y_max, height - 1)
        jobs.append((polygon, distance, x_min, y_min, x0, y0, x1, y1))
    if not jobs:
        return

    shapes = [(y1 - y0 + 1, x1 - x0 + 1) for *_, x0, y0, x1, y1 in jobs]
    sizes = [h * w for h, w in shapes]
    starts = np.cumsum([0] + sizes).tolist()
    squared = np.empty(starts[-1], dtype=np.float64)  # min over edges of the squared distance
    by_count: Dict[int, List[int]] = {}
    for j, job in enumerate(jobs):
        by_count.setdefault(len(job[0]), []).append(j)
    for members in by_count.values():
        _squared_border_distances([jobs[j] for j in members], [squared[starts[j] : starts[j + 1]] for j in members])

    # sqrt, / D and clip to [0, 1] are monotone and propagate NaN, so doing them after the
    # minimum over edges gives MMOCR's minimum over clipped distances exactly.
    with np.errstate(invalid="ignore"):
        np.sqrt(squared, out=squared)
    squared /= np.repeat([job[1] for job in jobs], sizes)
    np.maximum(squared, 0, out=squared)
    np.minimum(squared, 1, out=squared)
    value = 1 - squared.astype(np.float32)
    value *= thr_scale
    value += thr_min
    for j, (*_, x0, y0, x1, y1) in enumerate(jobs):
        window = thr_map[y0 : y1 + 1, x0 : x1 + 1]
        np.fmax(value[starts[j] : starts[j + 1]].reshape(shapes[j]), window, out=window)


def _squared_border_distances(jobs: List[tuple], outputs: List[np.ndarray]) -> None:
    """Minimum over edges of the squared DB distance, per pixel of each job's window.

    All jobs have polygons with the same number of vertices K, so the per-edge constants
    are computed for all of them at once; ``outputs`` are the flat (h * w,) float64 results.
    """
    polygons = np.stack([job[0] for job in jobs])  # (m, K, 2) float32
    origin = np.array([job[2:4] for job in jobs], dtype=np.float64)  # grown box corner
    window = np.array([job[4:8] for job in jobs], dtype=np.float64) - np.tile(origin, 2)  # local x0, y0, x1, y1
    # Vertices relative to the grown box, rounded back to float32 (MMOCR shifts in place),
    # and the squared edge lengths in float32, as numpy float32 scalar arithmetic gives them.
    local = (polygons.astype(np.float64) - origin[:, None, :]).astype(np.float32)
    ring32 = np.concatenate((local, local[:, :1]), axis=1)  # (m, K + 1, 2): edge i is ring[i], ring[i + 1]
    edge = ring32[:, :-1] - ring32[:, 1:]
    c2_32 = edge[..., 0] * edge[..., 0] + edge[..., 1] * edge[..., 1]  # (m, K)
    c2 = c2_32.astype(np.float64)
    c2_eps = (np.float32(_EPS32) + c2_32).astype(np.float64)
    ring = ring32.astype(np.float64)

    # An edge can only matter where its DB distance is < D: elsewhere it clips to 1, above
    # any other edge, and a pixel with no edge below D keeps its value. That distance is
    # never below the true distance to the segment, so the box of the segment grown by D
    # (plus a margin for rounding) holds every pixel the edge can change; the NaN case
    # (|cos| > 1 from rounding) happens only on the segment itself.
    reach = np.array([job[1] for job in jobs]) + _CAPSULE_MARGIN
    lo = np.ceil(np.minimum(ring[:, :-1], ring[:, 1:]) - reach[:, None, None])
    hi = np.floor(np.maximum(ring[:, :-1], ring[:, 1:]) + reach[:, None, None])
    box = np.stack(
        (
            np.maximum(lo[..., 0], window[:, None, 0]),
            np.maximum(lo[..., 1], window[:, None, 1]),
            np.minimum(hi[..., 0], window[:, None, 2]),
            np.minimum(hi[..., 1], window[:, None, 3]),
        ),
        axis=-1,
    ).astype(np.int64)  # (m, K, 4): x0, y0, x1, y1 per edge, local coordinates
    box_sizes = np.maximum(box[..., 2] - box[..., 0] + 1, 0) * np.maximum(box[..., 3] - box[..., 1] + 1, 0)
    window = window.astype(np.int64).tolist()

    for j, out in enumerate(outputs):
        wx0, wy0, wx1, wy1 = window[j]
        out = out.reshape(wy1 - wy0 + 1, wx1 - wx0 + 1)
        edges = np.flatnonzero(box_sizes[j]).tolist()
        if _use_edge_boxes(int(box_sizes[j].sum()), len(edges), c2.shape[1] * out.size):
            out.fill(np.inf)
            for i in edges:
                bx0, by0, bx1, by1 = box[j, i].tolist()
                xs = np.arange(bx0, bx1 + 1, dtype=np.float64)
                ys = np.arange(by0, by1 + 1, dtype=np.float64)
                ends = _squared_distances(xs, ys, ring[j, i : i + 2])
                sq = _edge_distance_sq(ends[0], ends[1], c2[j, i], c2_eps[j, i])
                sub = out[by0 - wy0 : by1 - wy0 + 1, bx0 - wx0 : bx1 - wx0 + 1]
                np.minimum(sub, sq, out=sub)  # propagates NaN, like MMOCR's min
        else:
            xs = np.arange(wx0, wx1 + 1, dtype=np.float64)
            ys = np.arange(wy0, wy1 + 1, dtype=np.float64)
            ends = _squared_distances(xs, ys, ring[j])  # (K + 1, h, w)
            sq = _edge_distance_sq(ends[:-1], ends[1:], c2[j, :, None, None], c2_eps[j, :, None, None])
            np.min(sq, axis=0, out=out)


def _use_edge_boxes(box_elements: int, num_boxes: int, window_elements: int) -> bool:
    """Cheaper to run one numpy pass per edge box than one pass over (K, h, w)?"""
    return box_elements + _CALL_COST * num_boxes < window_elements + _CALL_COST


def _edge_distance_sq(a2: np.ndarray, b2: np.ndarray, c2, c2_eps) -> np.ndarray:
    """Squared DB distance from pixels to an edge (p1, p2), float64, MMOCR's operations in order.

    ``a2``, ``b2``: squared distances to p1 and p2; ``c2``: squared edge length computed in
    float32; ``c2_eps``: float32 ``eps + c2``. DB's heuristic (MhLiao/DB): the distance to
    the edge's line from the triangle (pixel, p1, p2), or, where the angle at the pixel is
    acute (neg_cos < 0), to the nearest end. NaN where float32 rounding of ``c2`` makes
    ``|cos| > 1`` on the segment, as in MMOCR.
    """
    ab = a2 * b2
    den = np.sqrt(ab)
    den *= 2
    den += _EPS32
    neg_cos = np.subtract(c2, a2)
    neg_cos -= b2
    neg_cos /= den
    sq = np.multiply(neg_cos, neg_cos, out=den)
    np.subtract(1, sq, out=sq)  # finite inputs: MMOCR's nan_to_num is a no-op here
    sq *= ab
    sq /= c2_eps
    np.copyto(sq, np.fmin(a2, b2, out=ab), where=neg_cos < 0)
    return sq


def _squared_distances(xs: np.ndarray, ys: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(K, len(ys), len(xs)) float64 squared distances from grid pixels to K float64 points."""
    dx = xs[None, :] - points[:, 0, None]
    dy = ys[None, :] - points[:, 1, None]
    dx *= dx
    dy *= dy
    return np.add(dx[:, None, :], dy[:, :, None])

import math

import cv2
import numpy as np
import pyclipper
import pytest
from shapely.geometry import Polygon

from dbnetpp.data import targets as targets_module
from dbnetpp.data.targets import db_targets
from dbnetpp.polygon import offset_polygon

EPS32 = np.float32(np.finfo(np.float32).eps)
THR_MIN = np.float32(0.3)
THR_MAX = np.float32(0.4) + np.float32(0.3)  # 1 * (0.7 - 0.3) + 0.3 in float32: 0.70000005


def rect(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float32)


def assert_empty_maps(maps, height, width, shrink_mask=True):
    assert not maps["shrink_map"].any()
    assert not maps["thr_mask"].any()
    assert (maps["thr_map"] == THR_MIN).all()
    if shrink_mask:
        assert (maps["shrink_mask"] == 1).all()
    for value in maps.values():
        assert value.shape == (height, width) and value.dtype == np.float32


# ------------------------------------------------------------------- slow, plain reference


def _clipper(points, distance):
    pco = pyclipper.PyclipperOffset()
    pco.AddPath(points, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    return pco.Execute(distance)


def _pixel_distance(px, py, p1, p2):
    """DB's point-to-edge heuristic for one pixel, in plain Python floats (c2 in float32)."""
    a2 = (px - float(p1[0])) * (px - float(p1[0])) + (py - float(p1[1])) * (py - float(p1[1]))
    b2 = (px - float(p2[0])) * (px - float(p2[0])) + (py - float(p2[1])) * (py - float(p2[1]))
    edge = p1 - p2  # float32 vertices -> float32 arithmetic, as numpy scalars do
    c2_32 = edge[0] * edge[0] + edge[1] * edge[1]
    c2, c2_eps = float(c2_32), float(EPS32 + c2_32)
    neg_cos = (c2 - a2 - b2) / (float(EPS32) + 2 * math.sqrt(a2 * b2))
    if neg_cos < 0:
        return math.sqrt(min(a2, b2))
    value = a2 * b2 * (1 - neg_cos * neg_cos) / c2_eps
    return math.sqrt(value) if value >= 0 else math.nan  # numpy's sqrt gives NaN there


def reference_targets(polygons, ignore, height, width):
    """MMOCR's recipe written plainly: the threshold map one pixel and one edge at a time."""
    polygons = [np.asarray(p, dtype=np.float32).reshape(-1, 2) for p in polygons]
    ignore = list(ignore)
    for i, poly in enumerate(polygons):
        if abs(Polygon(poly).area) < 1 or min(cv2.minAreaRect(poly)[1]) < 8:
            ignore[i] = True
    shrink = np.zeros((height, width), np.uint8)
    for i, poly in enumerate(polygons):
        if ignore[i]:
            continue
        as_int = poly.astype(np.int32)
        shape = Polygon(as_int)
        d = int(shape.area * (1 - 0.4 * 0.4) / (shape.length + 0.001) + 0.5)
        paths = _clipper(as_int, -d)
        if not paths or any(len(p) != len(paths[0]) for p in paths):
            ignore[i] = True
            continue
        cv2.fillPoly(shrink, [np.array(paths[0], np.int32)], 1)
    mask = np.ones((height, width), np.uint8)
    for i, poly in enumerate(polygons):
        if ignore[i]:
            cv2.fillPoly(mask, [poly.astype(np.int32)], 0)

    canvas = np.zeros((height, width), np.float32)
    thr_mask = np.zeros((height, width), np.uint8)
    for i, poly in enumerate(polygons):
        if ignore[i]:
            continue
        shape = Polygon(poly)
        big_d = shape.area * (1 - 0.4**2) / shape.length
        paths = _clipper(poly, big_d)
        split = not paths or any(len(p) != len(paths[0]) for p in paths)
        grown = poly.astype(np.int32) if split else np.array(paths[0], np.int32)
        x_min, y_min = grown.min(axis=0)
        x_max, y_max = grown.max(axis=0)
        if x_max < 0 or y_max < 0 or x_min >= width or y_min >= height:
            continue
        cv2.fillPoly(thr_mask, [grown], 1)
        local = (poly.astype(np.float64) - [x_min, y_min]).astype(np.float32)
        for y in range(max(y_min, 0), min(y_max, height - 1) + 1):
            for x in range(max(x_min, 0), min(x_max, width - 1) + 1):
                px, py = float(x - x_min), float(y - y_min)
                scaled = []
                for k in range(len(local)):
                    d = _pixel_distance(px, py, local[k], local[(k + 1) % len(local)])
                    scaled.append(math.nan if math.isnan(d) else min(max(d / big_d, 0.0), 1.0))
                nearest = math.nan if any(map(math.isnan, scaled)) else min(scaled)
                value = np.float32(1) - np.float32(nearest)
                if not math.isnan(value):  # np.fmax keeps the canvas where the distance is NaN
                    canvas[y, x] = max(value, canvas[y, x])
    thr_map = canvas * np.float32(0.7 - 0.3) + np.float32(0.3)
    return {"shrink_map": shrink.astype(np.float32), "shrink_mask": mask.astype(np.float32),
            "thr_map": thr_map, "thr_mask": thr_mask.astype(np.float32)}


def random_quads(rng, num, height, width):
    quads = []
    for _ in range(num):
        centre = rng.uniform([-5, -5], [width + 5, height + 5])
        size = rng.uniform([8, 8], [40, 20])
        angle = rng.uniform(0, np.pi)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        quad = (np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * size / 2) @ rot.T + centre
        quad += rng.normal(0, 1.5, quad.shape)
        kind = rng.integers(3)
        quad = np.round(quad) if kind == 0 else (np.round(quad * 2) / 2 if kind == 1 else quad)
        quads.append(quad.astype(np.float32))
    return quads


@pytest.fixture(params=["edge_boxes", "whole_window"])
def distance_path(request, monkeypatch):
    """Run a test with each of the two ways the threshold distances are computed."""
    use_boxes = request.param == "edge_boxes"
    monkeypatch.setattr(targets_module, "_use_edge_boxes", lambda *args: use_boxes)
    return request.param


# ------------------------------------------------------------------------ hand-checked cases


def test_axis_aligned_rectangle_by_hand(distance_path):
    # 100 x 40 box: A = 4000, L = 280. Shrink d = int(4000 * 0.84 / 280.001 + 0.5) = 12;
    # grow D = 4000 * 0.84 / 280 = 12.
    maps = db_targets([rect(20, 30, 120, 70)], [False], 100, 160)
    shrink = np.zeros((100, 160), np.float32)
    shrink[42:59, 32:109] = 1  # (32, 42)-(108, 58), borders included by fillPoly
    np.testing.assert_array_equal(maps["shrink_map"], shrink)
    assert (maps["shrink_mask"] == 1).all()

    thr, thr_mask = maps["thr_map"], maps["thr_mask"]
    ys, xs = np.nonzero(thr_mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (8, 132, 18, 82)  # box grown by 12
    assert thr_mask[50, 8:133].all() and thr_mask[18, 20:121].all() and thr_mask[30:71, 8].all()
    assert thr_mask[18, 8] == 0 and thr_mask[82, 132] == 0  # round joins cut the corners
    full_box, corners = 125 * 65, 4 * (13 * 13 - math.pi * 12.5**2 / 4)
    assert abs(thr_mask.sum() - (full_box - corners)) < 0.01 * full_box

    np.testing.assert_allclose(thr[30, 20:121], 0.7, atol=1e-5)  # on the edges
    np.testing.assert_allclose(thr[30:71, 120], 0.7, atol=1e-5)
    ramp = 0.3 + 0.4 * (1 - np.arange(12, -1, -1) / 12)  # 12 px outside the left edge .. on it
    np.testing.assert_allclose(thr[50, 8:21], ramp, atol=1e-5)
    np.testing.assert_allclose(thr[24, 70], 0.5, atol=1e-6)  # 6 px above the top edge
    assert thr[50, 70] == THR_MIN  # 20 px from the long edges, > D
    outside = np.ones_like(thr_mask, dtype=bool)
    outside[18:83, 8:133] = False
    assert (thr[outside] == THR_MIN).all()
    assert thr.min() == THR_MIN and thr.max() <= THR_MAX


def test_ignored_polygon_zeroes_the_shrink_mask_only():
    maps = db_targets([rect(10.7, 10.7, 40.9, 30.9)], [True], 50, 60)
    mask = np.ones((50, 60), np.float32)
    mask[10:31, 10:41] = 0  # int32-truncated original polygon, borders included
    np.testing.assert_array_equal(maps["shrink_mask"], mask)
    assert_empty_maps(maps, 50, 60, shrink_mask=False)


def test_short_side_rule():
    short, ok = rect(10, 10, 110, 16), rect(10, 30, 110, 38)  # 6 px and 8 px high
    maps = db_targets([short, ok], [False, False], 60, 130)
    assert maps["shrink_mask"][10:17, 10:111].max() == 0  # 6 < 8: ignored
    assert maps["shrink_mask"][30:39, 10:111].min() == 1  # 8 is not < 8: kept
    assert not maps["shrink_map"][:20].any() and maps["shrink_map"][30:39].any()
    # the kept polygon alone gives the same kernel and threshold maps
    alone = db_targets([ok], [False], 60, 130)
    for key in ("shrink_map", "thr_map", "thr_mask"):
        np.testing.assert_array_equal(maps[key], alone[key])


def test_polygon_partly_outside_matches_a_larger_canvas(distance_path):
    poly = rect(140.5, 70.25, 190.5, 95.75)  # crosses the right and bottom borders of 160 x 80
    small = db_targets([poly], [False], 80, 160)
    large = db_targets([poly], [False], 120, 240)
    for key in small:
        np.testing.assert_array_equal(small[key], large[key][:80, :160])
    assert small["thr_mask"][79, 159] == 1 and small["shrink_map"][79, 159] == 1


def test_polygon_partly_outside_left_top_matches_reference(distance_path):
    polys = [rect(-20.5, -10.25, 30.5, 12.5), rect(-3, 40, 25, 52)]
    got = db_targets(polys, [False, False], 60, 80)
    ref = reference_targets(polys, [False, False], 60, 80)
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    assert got["thr_map"][12, 0] > 0.6  # 0.5 px from the bottom edge, in the clipped window


@pytest.mark.parametrize("poly", [rect(-80, -60, -40, -40), rect(200, 20, 260, 40), rect(20, 100, 60, 130)])
def test_grown_box_fully_outside_is_skipped(poly):
    maps = db_targets([poly], [False], 80, 160)
    assert_empty_maps(maps, 80, 160)


def test_degenerate_polygons_are_ignored():
    good = rect(40, 40, 100, 60)
    degenerate = [
        np.array([[10, 10], [20, 10], [30, 10], [40, 10]], np.float32),  # zero area
        np.array([[5, 5], [30, 20]], np.float32),  # two points
        np.array([[10, 20], [30, 35], [30, 20], [10, 35]], np.float32),  # symmetric bow-tie: area 0
        np.array([[1, 1], [np.nan, 5], [9, 9], [1, 9]], np.float32),  # NaN
        np.zeros((0, 2), np.float32),  # empty
        np.array([[50, 5], [50.4, 5], [50.2, 5.5]], np.float32),  # tiny triangle
    ]
    maps = db_targets(degenerate + [good], [False] * len(degenerate) + [False], 80, 120)
    alone = db_targets([good], [False], 80, 120)
    for key in ("shrink_map", "thr_map", "thr_mask"):
        np.testing.assert_array_equal(maps[key], alone[key])
    assert maps["shrink_mask"][10, 10:41].max() == 0  # the zero-area one is "drawn" as ignored
    assert maps["shrink_mask"][40:61, 40:101].min() == 1
    assert_empty_maps(db_targets(degenerate, [False] * len(degenerate), 80, 120), 80, 120, shrink_mask=False)


def test_on_edge_pixels_take_mmocr_nan_path(distance_path):
    # The float32 squared length of the top edge (69.3^2) rounds up, so on-edge pixels get
    # |cos| > 1 and a NaN distance in MMOCR: they keep the background instead of 0.7.
    poly = rect(18.1, 20, 87.4, 40)
    maps = db_targets([poly], [False], 80, 120)
    assert (maps["thr_map"][20, 19:88] == THR_MIN).all()
    assert (maps["thr_map"][19, 19:88] > 0.6).all() and (maps["thr_map"][21, 19:88] > 0.6).all()
    ref = reference_targets([poly], [False], 80, 120)
    np.testing.assert_array_equal(maps["thr_map"], ref["thr_map"])


def test_matches_plain_reference_on_random_quads(distance_path):
    rng = np.random.default_rng(2024)
    height, width = 48, 72
    for _ in range(4):
        quads = random_quads(rng, 5, height, width)
        ignore = rng.random(len(quads)) < 0.25
        got = db_targets(quads, ignore, height, width)
        ref = reference_targets(quads, ignore, height, width)
        for key in ref:
            np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


def test_matches_plain_reference_on_mixed_vertex_counts(distance_path):
    rng = np.random.default_rng(7)
    polys = []
    for count, centre in zip((3, 5, 6, 8), ([15, 15], [50, 18], [20, 40], [55, 42])):
        angles = np.sort(rng.uniform(0, 2 * np.pi, count))
        radii = rng.uniform(9, 14, (count, 1))
        polys.append((np.stack([np.cos(angles), np.sin(angles)], 1) * radii + centre).astype(np.float32))
    closed = np.concatenate([polys[1], polys[1][:1]])  # repeated closing vertex: a zero-length edge
    polys.append(closed + np.float32(3.5))
    got = db_targets(polys, [False] * len(polys), 60, 72)
    ref = reference_targets(polys, [False] * len(polys), 60, 72)
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    assert got["shrink_map"].any() and (got["thr_map"] > THR_MIN).sum() > 500


def test_matches_plain_reference_on_real_annotations(icdar_root):
    from dbnetpp.data.icdar2015 import ICDAR2015

    dataset = ICDAR2015(icdar_root, "test")
    for index in (1, 4):  # images with several cared-for boxes
        ann = dataset.load_annotations(index)
        polys = [p * np.float32(0.5) for p in ann["polygons"]]
        got = db_targets(polys, ann["ignore"], 360, 640)
        ref = reference_targets(polys, ann["ignore"], 360, 640)
        for key in ref:
            np.testing.assert_array_equal(got[key], ref[key], err_msg=f"image {index}: {key}")
        assert (~ann["ignore"]).sum() >= 2 and got["shrink_map"].any()


def test_inputs_are_not_modified_and_accept_flat_polygons():
    poly = rect(10.5, 10.5, 60.5, 30.5)
    before = poly.copy()
    ignore = np.array([False])
    maps = db_targets([poly.reshape(-1).astype(np.float64)], ignore, 50, 80)
    np.testing.assert_array_equal(poly, before)
    assert not ignore[0]
    for key, value in db_targets([poly], [False], 50, 80).items():
        np.testing.assert_array_equal(maps[key], value)


def test_no_polygons():
    assert_empty_maps(db_targets([], [], 7, 9), 7, 9)


@pytest.mark.parametrize(
    "args, message",
    [
        (([rect(0, 0, 9, 9)], [False, True], 10, 10), "1 polygons but 2 ignore flags"),
        (([np.zeros(5)], [False], 10, 10), "polygon 0 has shape"),
        (([rect(0, 0, 9, 9)], [False], 0, 10), "positive integers"),
    ],
)
def test_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        db_targets(*args)


def test_offset_polygon_quirks():
    square = rect(0, 0, 40, 40)
    grown = offset_polygon(square, 5)
    assert grown.dtype == np.float32 and grown.ndim == 2 and grown.shape[1] == 2
    assert grown[:, 0].min() == -5 and grown[:, 0].max() == 45
    # truncation
    np.testing.assert_array_equal(offset_polygon(rect(0.9, 0.9, 40.9, 40.9), 0), offset_polygon(square, 0))
    assert offset_polygon(square, -25).shape == (0, 2)  # shrunk away
    # a square and a triangle joined by a thin bar split into parts of different sizes -> empty
    dumbbell = np.array([[0, 0], [30, 0], [30, 12], [60, 12], [75, 0], [90, 30], [60, 18], [30, 18],
                         [30, 30], [0, 30]], np.float32)
    parts = _clipper(dumbbell, -4)
    assert len(parts) == 2 and len(parts[0]) != len(parts[1])
    assert offset_polygon(dumbbell, -4).shape == (0, 2)
    # two equal squares joined by a thin bar: equal parts -> the first one
    twins = np.array([[0, 0], [30, 0], [30, 12], [60, 12], [60, 0], [90, 0], [90, 30],
                      [60, 30], [60, 18], [30, 18], [30, 30], [0, 30]], np.float32)
    parts = _clipper(twins, -4)
    assert len(parts) == 2 and len(parts[0]) == len(parts[1])
    np.testing.assert_array_equal(offset_polygon(twins, -4), np.array(parts[0], np.float32))
    assert offset_polygon(np.zeros((0, 2)), 3).shape == (0, 2)
    assert offset_polygon(np.array([[0, 0], [np.nan, 1], [2, 2]]), 3).shape == (0, 2)

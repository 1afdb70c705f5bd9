import cv2
import numpy as np
import pyclipper
import pytest
import torch
from shapely.geometry import Polygon

from dbnetpp.postprocess import DBPostProcessor, area_and_perimeter


def reference(prob, text_repr_type="quad", mask_thr=0.3, min_text_score=0.3, min_text_width=5,
              unclip_ratio=1.5, epsilon_ratio=0.002, max_candidates=3000):
    """MMOCR's procedure step by step: shapely geometry, bounding box by
    floor/ceil and clipping, mask filled in the box."""
    score_map = prob.astype(np.float32)
    binary = ((prob > mask_thr).astype(np.uint8) * 255).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    h, w = score_map.shape
    polygons, scores = [], []
    for i, contour in enumerate(contours):
        if i > max_candidates:
            break
        pts = cv2.approxPolyDP(contour, epsilon_ratio * cv2.arcLength(contour, True), True).reshape(-1, 2)
        if len(pts) < 4:
            continue
        x0 = int(np.clip(np.floor(pts[:, 0].min()), 0, w - 1))
        x1 = int(np.clip(np.ceil(pts[:, 0].max()), 0, w - 1))
        y0 = int(np.clip(np.floor(pts[:, 1].min()), 0, h - 1))
        y1 = int(np.clip(np.ceil(pts[:, 1].max()), 0, h - 1))
        box_mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
        cv2.fillPoly(box_mask, [(pts - [x0, y0]).astype(np.int32)], 1)
        score = cv2.mean(score_map[y0:y1 + 1, x0:x1 + 1], box_mask)[0]
        if score < min_text_score:
            continue
        shape = Polygon(pts)
        # MMOCR's offset_polygon (REFERENCE.md 6): pyclipper on the integer points, round joins;
        # no path or a split into paths of different lengths -> dropped, else the first path
        clipper = pyclipper.PyclipperOffset()
        clipper.AddPath(pts.astype(np.int64).tolist(), pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
        paths = clipper.Execute(shape.area * unclip_ratio / shape.length)
        if not paths or len({len(path) for path in paths}) > 1:
            continue
        expanded = np.array(paths[0], dtype=np.float32).reshape(-1, 2)
        if text_repr_type == "quad":
            rect = cv2.minAreaRect(expanded)
            if min(rect[1]) < min_text_width:
                continue
            out = cv2.boxPoints(rect)
        else:
            out = expanded
        if out.size < 8:
            continue
        polygons.append(out)
        scores.append(float(np.float32(score)))
    return polygons, scores


def iou(a, b):
    return Polygon(a).intersection(Polygon(b)).area / Polygon(a).union(Polygon(b)).area


def fill(shape, polygons, values):
    prob = np.zeros(shape, np.float32)
    for poly, v in zip(polygons, values):
        cv2.fillPoly(prob, [np.round(np.asarray(poly)).astype(np.int32)], float(v))
    return prob


def random_map(seed, size=(160, 240)):
    """Blurred rotated boxes, ellipses, a ring (gives a hole contour) and noise."""
    rng = np.random.default_rng(seed)
    prob = np.zeros(size, np.float32)
    h, w = size
    for _ in range(rng.integers(3, 9)):
        box = cv2.boxPoints(((rng.uniform(0, w), rng.uniform(0, h)), (rng.uniform(2, 90), rng.uniform(2, 30)),
                             rng.uniform(-90, 90)))
        cv2.fillPoly(prob, [np.round(box).astype(np.int32)], float(rng.uniform(0.2, 1.0)))
    for _ in range(rng.integers(1, 4)):
        cv2.ellipse(prob, (int(rng.uniform(0, w)), int(rng.uniform(0, h))),
                    (int(rng.uniform(1, 30)), int(rng.uniform(1, 15))), float(rng.uniform(0, 180)), 0, 360,
                    float(rng.uniform(0.25, 0.9)), -1)
    cv2.circle(prob, (int(rng.uniform(20, w - 20)), int(rng.uniform(20, h - 20))), 15, 0.8, 6)
    prob = cv2.GaussianBlur(prob, (5, 5), float(rng.uniform(0.5, 2.0)))
    prob += rng.normal(0, 0.03, size).astype(np.float32)
    return np.clip(prob, 0, 1)


@pytest.mark.parametrize("text_repr_type", ["quad", "poly"])
@pytest.mark.parametrize("seed", range(6))
def test_identical_to_reference_procedure(seed, text_repr_type):
    prob = random_map(seed)
    kwargs = {"text_repr_type": text_repr_type}
    if seed % 3 == 1:
        kwargs.update(mask_thr=0.5, min_text_score=0.6, unclip_ratio=2.0, epsilon_ratio=0.01)
    got, got_scores = DBPostProcessor(**kwargs)(prob)
    want, want_scores = reference(prob, **kwargs)
    assert len(want) > 0
    assert got_scores == want_scores
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == np.float32 and a.ndim == 2 and a.shape[1] == 2
        np.testing.assert_array_equal(a, b)


def test_area_and_perimeter_equal_shapely_bit_for_bit():
    rng = np.random.default_rng(0)
    for _ in range(300):
        pts = rng.integers(0, 2000, size=(int(rng.integers(3, 40)), 2)).astype(np.int32)
        area, perimeter = area_and_perimeter(pts)
        shape = Polygon(pts)  # often self-crossing: GEOS still uses the shoelace sum
        assert area == shape.area
        assert perimeter == shape.length


def expected_unclipped_box(points, unclip_ratio=1.5):
    """The rectangle grown by the unclip distance of its own area / perimeter."""
    (cx, cy), (w, h), angle = cv2.minAreaRect(np.asarray(points, np.float32))
    d = w * h * unclip_ratio / (2 * (w + h))
    return cv2.boxPoints(((cx, cy), (w + 2 * d, h + 2 * d), angle))


def test_axis_aligned_rectangle():
    rect = np.array([[100, 50], [299, 50], [299, 89], [100, 89]], np.float32)
    prob = fill((200, 400), [rect], [0.9])
    polygons, scores = DBPostProcessor()(prob)
    assert len(polygons) == 1
    assert scores[0] == pytest.approx(0.9, abs=1e-6)
    # the contour runs through the centres of the border pixels: exactly `rect`
    assert iou(polygons[0], expected_unclipped_box(rect)) > 0.98


@pytest.mark.parametrize("angle", [-60.0, -20.0, 15.0, 40.0, 75.0])
def test_rotated_rectangles(angle):
    centers = [(120, 90), (330, 200)]
    sizes = [(150, 36), (110, 48)]
    boxes = [cv2.boxPoints((c, s, angle)) for c, s in zip(centers, sizes)]
    prob = fill((300, 460), boxes, [0.9, 0.7])
    polygons, scores = DBPostProcessor()(prob)
    assert len(polygons) == 2
    for box, score in zip(boxes, [0.9, 0.7]):
        # the region's own border (pixel centres) is about half a pixel inside `box`
        best = max(iou(p, expected_unclipped_box(box)) for p in polygons)
        assert best > 0.95
    assert sorted(scores) == pytest.approx([0.7, 0.9], abs=0.03)


def test_curved_text_gives_many_points_in_poly_mode():
    prob = np.zeros((300, 400), np.float32)
    cv2.ellipse(prob, (200, 250), (150, 150), 0, 200, 340, 0.9, 30)
    quads, _ = DBPostProcessor(text_repr_type="quad")(prob)
    polys, scores = DBPostProcessor(text_repr_type="poly")(prob)
    assert len(quads) == 1 and quads[0].shape == (4, 2)
    assert len(polys) == 1 and polys[0].shape[0] > 4
    assert scores[0] == pytest.approx(0.9, abs=0.03)  # chords of the arc cut a few outside pixels
    # the unclipped arc contains the drawn arc
    drawn = cv2.findContours((prob > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0][0]
    assert Polygon(polys[0]).buffer(1).contains(Polygon(drawn.reshape(-1, 2)))


def test_narrow_region_is_dropped():
    prob = fill((100, 200), [[[20, 40], [160, 40], [160, 42], [20, 42]]], [0.9])  # 3 pixels high
    keep_all, _ = DBPostProcessor(min_text_width=0)(prob)
    assert len(keep_all) == 1
    short_side = min(cv2.minAreaRect(keep_all[0])[1])
    assert short_side < 5
    assert DBPostProcessor()(prob) == ([], [])
    assert len(DBPostProcessor(min_text_width=short_side)(prob)[0]) == 1


def test_low_score_region_is_dropped():
    prob = fill((100, 200), [[[20, 20], [120, 20], [120, 50], [20, 50]]], [0.35])
    polygons, scores = DBPostProcessor()(prob)
    assert len(polygons) == 1 and scores[0] == pytest.approx(0.35, abs=1e-6)
    assert DBPostProcessor(min_text_score=0.4)(prob) == ([], [])
    assert DBPostProcessor(mask_thr=0.35)(prob) == ([], [])  # strictly greater than mask_thr


def test_max_candidates():
    squares = [[[10 + 30 * i, 10], [30 + 30 * i, 10], [30 + 30 * i, 30], [10 + 30 * i, 30]] for i in range(10)]
    prob = fill((60, 320), squares, [0.9] * 10)
    assert len(DBPostProcessor()(prob)[0]) == 10
    # MMOCR stops at contour index > max_candidates, so max_candidates + 1 are looked at
    assert len(DBPostProcessor(max_candidates=3)(prob)[0]) == 4
    assert len(DBPostProcessor(max_candidates=0)(prob)[0]) == 1


def test_empty_map():
    assert DBPostProcessor()(np.zeros((64, 96), np.float32)) == ([], [])
    assert DBPostProcessor(text_repr_type="poly")(torch.zeros(64, 96)) == ([], [])


def test_scale_divides_coordinates():
    prob = random_map(11)
    pp = DBPostProcessor()
    plain, scores = pp(prob)
    scaled, scaled_scores = pp(prob, scale=(1.421875, 1.4222222222222223))
    assert scores == scaled_scores and len(plain) == len(scaled) > 0
    for a, b in zip(plain, scaled):
        assert b.dtype == np.float32
        np.testing.assert_allclose(b, a / np.array([1.421875, 1.4222222222222223]), rtol=1e-6)
    with pytest.raises(ValueError, match="scale"):
        pp(prob, scale=(1.0, 0.0))


def test_torch_and_other_dtypes():
    prob = random_map(12)
    want = DBPostProcessor()(prob)
    for variant in (torch.from_numpy(prob), torch.from_numpy(prob).double(), prob.astype(np.float64),
                    torch.from_numpy(prob).requires_grad_(True), np.asfortranarray(prob),
                    torch.from_numpy(prob.T.copy()).T):
        got = DBPostProcessor()(variant)
        assert got[1] == pytest.approx(want[1], abs=1e-6)
        assert len(got[0]) == len(want[0])
    if torch.cuda.is_available():
        got = DBPostProcessor()(torch.from_numpy(prob).cuda())
        assert got[1] == want[1]


def test_bad_input():
    pp = DBPostProcessor()
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        pp(np.zeros((1, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        pp(torch.zeros(2, 1, 32, 32))
    with pytest.raises(TypeError, match="floating"):
        pp(np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="text_repr_type"):
        DBPostProcessor(text_repr_type="box")


def test_repr():
    text = repr(DBPostProcessor(unclip_ratio=2.0))
    assert "DBPostProcessor(" in text and "unclip_ratio=2.0" in text and "epsilon_ratio=0.002" in text

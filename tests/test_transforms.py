import cv2
import numpy as np
import pytest
import shapely
import torchvision.transforms.functional as TF
from PIL import Image
from shapely.geometry import Polygon

from dbnetpp.data import transforms as T


def raster(polygons, height, width):
    """Independent rasterisation of polygons in continuous coordinates (pixel centre = index + 0.5)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for poly in polygons:
        pts = np.round((np.asarray(poly, dtype=np.float64) - 0.5) * 16).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1, cv2.LINE_8, shift=4)
    return mask.astype(bool)


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def white_polygon_image(polygons, height, width):
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[raster(polygons, height, width)] = 255
    return image


def bright(image):
    return image.max(axis=2) >= 128


QUAD = np.array([[90, 70], [230, 85], [222, 150], [84, 136]], dtype=np.float32)


# ----------------------------------------------------------------------------- colour jitter


@pytest.mark.parametrize("factor", [1 - 32 / 255, 0.9137, 1.0, 1.0571, 1 + 32 / 255, 0.0, 2.3])
def test_brightness_matches_torchvision_pil(factor):
    rgb = np.random.default_rng(0).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    expected = np.asarray(TF.adjust_brightness(Image.fromarray(rgb), factor))
    got = T.adjust_brightness(np.ascontiguousarray(rgb[:, :, ::-1]), factor)[:, :, ::-1]
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert np.array_equal(got, expected)  # PIL's float32 blend reproduced exactly


@pytest.mark.parametrize("factor", [0.5, 0.61803, 0.999, 1.0, 1.2345, 1.5, 0.0, 3.0])
def test_saturation_matches_torchvision_pil(factor):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(41, 67, 3), dtype=np.uint8)
    rgb[:5] = rng.integers(0, 256, size=(5, 67, 1), dtype=np.uint8)  # grey rows: L == R == G == B
    expected = np.asarray(TF.adjust_saturation(Image.fromarray(rgb), factor))
    got = T.adjust_saturation(np.ascontiguousarray(rgb[:, :, ::-1]), factor)[:, :, ::-1]
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("saturation_first", [False, True])
def test_color_jitter_applies_both_ops_in_order(saturation_first):
    bgr = np.random.default_rng(2).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    params = T.TrainParams(1.1, 0.6, saturation_first, False, 0.0, 1.0)
    pil = Image.fromarray(bgr[:, :, ::-1].copy())
    if saturation_first:
        pil = TF.adjust_brightness(TF.adjust_saturation(pil, 0.6), 1.1)
    else:
        pil = TF.adjust_saturation(TF.adjust_brightness(pil, 1.1), 0.6)
    assert np.array_equal(T.color_jitter(bgr, params), np.asarray(pil)[:, :, ::-1])


def test_sampled_parameters_follow_the_recipe_distributions():
    rng = np.random.default_rng(3)
    params = [T.sample_train_params(rng) for _ in range(4000)]
    b = np.array([p.brightness for p in params])
    s = np.array([p.saturation for p in params])
    angle = np.array([p.angle_deg for p in params])
    scale = np.array([p.scale for p in params])
    assert b.min() >= 1 - 32 / 255 and b.max() <= 1 + 32 / 255 and abs(b.mean() - 1) < 0.01
    assert s.min() >= 0.5 and s.max() <= 1.5 and abs(s.mean() - 1) < 0.03
    assert angle.min() >= -10 and angle.max() <= 10 and abs(angle.mean()) < 0.4
    assert scale.min() >= 0.5 and scale.max() <= 3.0 and abs(scale.mean() - 1.75) < 0.05
    for flags in ([p.flip for p in params], [p.saturation_first for p in params]):
        assert 0.45 < np.mean(flags) < 0.55


# ----------------------------------------------------------------------------- geometry


def test_rotation_turns_clockwise_on_screen_about_the_centre():
    # imgaug/skimage convention: with y down, +90 degrees takes a point right of the
    # centre to below it. Hand-computed for a 200 x 100 image, centre (100, 50).
    _, (moved,) = T.rotate(np.zeros((100, 200, 3), np.uint8), [np.array([[110.0, 50.0], [100, 50], [100, 40]])], 90.0)
    np.testing.assert_allclose(moved, [[100, 60], [100, 50], [110, 50]], atol=1e-4)


@pytest.mark.parametrize("angle", [-10.0, -3.3, 7.5, 10.0])
def test_rotate_keeps_points_on_the_image(angle):
    image = white_polygon_image([QUAD], 240, 320)
    out, (quad,) = T.rotate(image, [QUAD], angle)
    assert out.shape == image.shape
    assert iou(bright(out), raster([quad], 240, 320)) >= 0.95


def test_hflip_keeps_points_on_the_image():
    image = white_polygon_image([QUAD], 240, 320)
    out, (quad,) = T.hflip(image, [QUAD])
    np.testing.assert_allclose(quad[:, 0], 320 - QUAD[:, 0])
    assert np.array_equal(out, image[:, ::-1])
    assert iou(bright(out), raster([quad], 240, 320)) >= 0.98


@pytest.mark.parametrize("factor", [0.5, 0.77, 1.9, 3.0])
def test_rescale_keeps_points_on_the_image(factor):
    image = white_polygon_image([QUAD], 240, 320)
    out, (quad,) = T.rescale(image, [QUAD], factor)
    assert out.shape[:2] == (round(240 * factor), round(320 * factor))
    np.testing.assert_allclose(quad, QUAD * [out.shape[1] / 320, out.shape[0] / 240], rtol=1e-6)
    assert iou(bright(out), raster([quad], *out.shape[:2])) >= 0.95


def test_crop_and_keep_ratio_resize_keep_points_on_the_image():
    image = white_polygon_image([QUAD], 240, 320)
    cropped, (quad,), keep = T.crop(image, [QUAD], (60, 40, 260, 200))
    assert keep == [0] and cropped.shape == (160, 200, 3)
    np.testing.assert_allclose(quad, QUAD - [60, 40])
    assert iou(bright(cropped), raster([quad], 160, 200)) >= 0.95
    resized, (quad,) = T.resize_keep_ratio(cropped, [quad], 640)
    assert resized.shape == (512, 640, 3)  # s = 640 / 200
    assert iou(bright(resized), raster([quad], 512, 640)) >= 0.95


def test_resize_for_test_scale_and_size():
    image = np.random.default_rng(4).integers(0, 256, size=(720, 1280, 3), dtype=np.uint8)
    out, (sx, sy) = T.resize_for_test(image)
    assert out.shape == (1024, 1820, 3)  # s = min(4068 / 1280, 1024 / 720)
    assert (sx, sy) == (1820 / 1280, 1024 / 720)
    assert np.array_equal(out, cv2.resize(image, (1820, 1024), interpolation=cv2.INTER_LINEAR))
    tall, (sx, sy) = T.resize_for_test(np.zeros((3000, 500, 3), np.uint8))
    s = min(4068 / 3000, 1024 / 500)  # the long side limits here
    assert tall.shape[:2] == (int(3000 * s + 0.5), int(500 * s + 0.5))


def test_resize_polygons_is_mmocr_crop_polygon():
    square = np.array([[10, 10], [30, 10], [30, 20], [10, 20]], dtype=np.float32)
    outside = np.array([[100, 100], [120, 100], [120, 110]], dtype=np.float32)
    straddling = np.array([[-10, 5], [20, 5], [20, 15], [-10, 15]], dtype=np.float32)
    got = T.resize_polygons([square, outside, straddling], (2.0, 0.5), 40, 80)
    # scaled, closed ring reversed: shapely's ring of the intersection, reversed
    ring = np.asarray(Polygon(square * [2.0, 0.5]).intersection(shapely.box(0, 0, 80, 40)).exterior.coords)[::-1]
    np.testing.assert_allclose(got[0], ring)
    assert len(got[0]) == 5 and np.array_equal(got[0][0], got[0][-1])
    assert np.array_equal(got[1], np.zeros((3, 2), np.float32))  # no overlap -> zeros, same point count
    assert Polygon(got[2]).area == pytest.approx(20 * 10 * 2.0 * 0.5)  # clipped at x = 0


def test_clip_polygons_drops_invalid_and_outside_and_clips_the_rest():
    inside = np.array([[10, 10], [40, 10], [40, 30], [10, 30]], dtype=np.float32)
    partly = np.array([[50, 20], [120, 20], [120, 40], [50, 40]], dtype=np.float32)
    outside = np.array([[150, 10], [160, 10], [160, 20]], dtype=np.float32)
    bowtie = np.array([[10, 40], [30, 60], [30, 40], [10, 60]], dtype=np.float32)
    line = np.array([[1, 1], [5, 5]], dtype=np.float32)
    polys, keep = T.clip_polygons([inside, partly, outside, bowtie, line], 50, 100)
    assert keep == [0, 1]
    assert Polygon(polys[0]).area == pytest.approx(600)
    assert Polygon(polys[1]).area == pytest.approx(50 * 20)  # x clipped to 100
    assert polys[1][:, 0].max() == 100
    for poly, src in zip(polys, (inside, partly)):
        assert np.array_equal(poly[0], src[0])  # imgaug starts at the vertex nearest an original one
        assert len(poly) == len(np.unique(poly, axis=0)) + 1  # shapely's closing point kept


def test_fix_invalid_polygons():
    good = np.array([[0, 0], [10, 0], [10, 5], [0, 5]], dtype=np.float32)
    triangle = np.array([[0, 0], [10, 0], [5, 5]], dtype=np.float32)
    bowtie = np.array([[0, 0], [10, 10], [10, 0], [0, 10]], dtype=np.float32)
    collinear = np.array([[0, 0], [5, 0], [10, 0], [3, 0]], dtype=np.float32)
    two_points = np.array([[0, 0], [4, 4]], dtype=np.float32)
    polys, keep = T.fix_invalid_polygons([good, triangle, bowtie, collinear, two_points])
    assert keep == [0, 1, 2]
    assert polys[0] is good or np.array_equal(polys[0], good)
    assert len(polys[1]) == 4 and np.array_equal(polys[1][0], polys[1][-1])  # < 4 points: ring, closed
    fixed = Polygon(polys[2])
    assert fixed.is_valid and fixed.area == pytest.approx(25)  # buffer(0) keeps one lobe of the bow-tie
    assert np.array_equal(polys[2][0], polys[2][-1])


# ----------------------------------------------------------------------------- random crop


def mmocr_crop_box(polygons, height, width, rng, min_side_ratio=0.1):
    """MMOCR RandomCrop._sample_crop_box written out independently (hstack/diff runs)."""

    def runs(arr):
        diff = np.hstack([0, arr]) - np.hstack([arr, 0])
        return np.where(diff < 0)[0], np.where(diff > 0)[0]

    def start_end(valid, min_len, max_start, min_end):
        arr = valid.copy()
        arr[min(len(arr) - min_len, max_start):] = 0
        arr[0] = 1
        starts, ends = runs(arr)
        k = rng.integers(0, len(starts))
        start = rng.integers(starts[k], ends[k])
        arr = valid.copy()
        arr[: max(start + min_len, min_end)] = 0
        arr[-1] = 1
        starts, ends = runs(arr)
        k = rng.integers(0, len(starts))
        return start, rng.integers(starts[k], ends[k])

    x_valid, y_valid = np.ones(width + 1, np.int32), np.ones(height + 1, np.int32)
    kept = rng.integers(0, len(polygons))
    for i, poly in enumerate(polygons):
        cx, cy = np.clip(poly[:, 0], 0, width), np.clip(poly[:, 1], 0, height)
        x0, y0 = int(np.floor(cx.min())), int(np.floor(cy.min()))
        x1, y1 = int(np.ceil(cx.max())), int(np.ceil(cy.max()))
        x_valid[x0:x1] = 0
        y_valid[y0:y1] = 0
        if i == kept:
            box = (x0, x1, y0, y1)
    xa, xb = start_end(x_valid, int(width * min_side_ratio), box[0], box[1])
    ya, yb = start_end(y_valid, int(height * min_side_ratio), box[2], box[3])
    return int(xa), int(ya), int(xb), int(yb)


def random_polygons(rng, height, width, count):
    """Random boxes, clipped to the image as the pipeline does before cropping."""
    polys = []
    for _ in range(count):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(5, width / 3), rng.uniform(4, height / 5)
        polys.append(np.array([[cx - w, cy - h], [cx + w, cy - h], [cx + w, cy + h], [cx - w, cy + h]], np.float32))
    return T.clip_polygons(polys, height, width)[0]


def test_crop_box_matches_mmocr_sampling_and_keeps_the_chosen_polygon():
    for seed in range(60):
        rng = np.random.default_rng(seed)
        height, width = int(rng.integers(50, 400)), int(rng.integers(50, 400))
        polys = random_polygons(rng, height, width, int(rng.integers(1, 9)))
        box = T.sample_crop_box(polys, height, width, np.random.default_rng([seed, 1]))
        assert box == mmocr_crop_box(polys, height, width, np.random.default_rng([seed, 1]))
        x1, y1, x2, y2 = box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert x2 - x1 >= int(0.1 * width) and y2 - y1 >= int(0.1 * height)
        kept, keep = T.crop_polygons(polys, box)
        assert keep, "the polygon chosen to stay inside was dropped"
        for poly in kept:
            assert poly.min() >= 0 and poly[:, 0].max() <= x2 - x1 and poly[:, 1].max() <= y2 - y1


def test_crop_keeps_only_fully_contained_polygons():
    inside = np.array([[12, 12], [30, 12], [30, 20], [12, 20]], dtype=np.float32)
    touching = np.array([[10, 25], [40, 25], [40, 30], [10, 30]], dtype=np.float32)  # on the border
    partial = np.array([[35, 12], [70, 12], [70, 20], [35, 20]], dtype=np.float32)
    outside = np.array([[80, 80], [90, 80], [90, 90]], dtype=np.float32)
    image = np.arange(100 * 100 * 3, dtype=np.uint32).astype(np.uint8).reshape(100, 100, 3)
    out, polys, keep = T.crop(image, [inside, touching, partial, outside], (10, 10, 50, 30))
    assert keep == [0, 1]
    assert np.array_equal(out, image[10:30, 10:50])
    np.testing.assert_allclose(polys[0], inside - [10, 10])
    with pytest.raises(ValueError, match="crop box"):
        T.crop(image, [], (10, 10, 120, 30))


# ----------------------------------------------------------------------------- full pipeline


def pipeline_case(seed):
    rng = np.random.default_rng(seed)
    height, width = 300, 420
    cx, cy = rng.uniform(140, 280), rng.uniform(100, 200)
    quad = np.array([[cx - 110, cy - 45], [cx + 115, cy - 40], [cx + 110, cy + 50], [cx - 105, cy + 42]], np.float32)
    return white_polygon_image([quad], height, width), [quad]


@pytest.mark.parametrize("fused", [True, False])
def test_pipeline_keeps_points_on_the_image(fused):
    for seed in range(8):
        image, polys = pipeline_case(seed)
        out = T.train_transform(image, polys, [False], np.random.default_rng(seed), fused=fused)
        assert out.image.shape == (640, 640, 3) and out.image.dtype == np.uint8
        assert len(out.polygons) == 1 and out.ignore.tolist() == [False]
        assert iou(bright(out.image), raster(out.polygons, 640, 640)) >= 0.95


def test_pipeline_output_size_option_and_bounds():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, size=(200, 360, 3), dtype=np.uint8)
    polys = random_polygons(rng, 200, 360, 6)
    ignore = [False, True, False, False, True, False]
    for seed in range(10):
        out = T.train_transform(image, polys, ignore, np.random.default_rng(seed), size=256)
        assert out.image.shape == (256, 256, 3)
        assert len(out.polygons) == len(out.ignore) >= 1
        for poly in out.polygons:
            assert poly.dtype == np.float32 and poly.min() >= 0 and poly.max() <= 256


def test_pipeline_is_deterministic_per_generator_and_none_without_polygons():
    image, polys = pipeline_case(0)
    a = T.train_transform(image, polys, None, np.random.default_rng(11))
    b = T.train_transform(image, polys, None, np.random.default_rng(11))
    c = T.train_transform(image, polys, None, np.random.default_rng(12))
    assert np.array_equal(a.image, b.image) and all(np.array_equal(p, q) for p, q in zip(a.polygons, b.polygons))
    assert not np.array_equal(a.image, c.image)
    assert T.train_transform(image, [], None, np.random.default_rng(0)) is None
    far_away = [np.array([[1000, 1000], [1100, 1000], [1100, 1050]], np.float32)]
    assert T.train_transform(image, far_away, None, np.random.default_rng(0)) is None


def fused_vs_reference(image, polys, ignore, seeds):
    diffs = []
    for seed in seeds:
        fast = T.train_transform(image, polys, ignore, np.random.default_rng(seed), fused=True)
        slow = T.train_transform(image, polys, ignore, np.random.default_rng(seed), fused=False)
        if fast is None:
            assert slow is None
            continue
        # the polygons are computed once, before the rendering branch, so comparing fast's with
        # slow's proves nothing: check them against the step-by-step rendering of a marker image
        # (the input polygons filled white) instead
        marker = T.train_transform(white_polygon_image(polys, *image.shape[:2]), polys, ignore,
                                   np.random.default_rng(seed), fused=False)
        assert len(marker.polygons) == len(fast.polygons) and np.array_equal(marker.ignore, fast.ignore)
        marker_iou = iou(bright(marker.image), raster(marker.polygons, *marker.image.shape[:2]))
        assert marker_iou >= 0.8, (seed, marker_iou)
        content = slow.image.max(axis=2) > 0
        diff = np.abs(fast.image.astype(np.int16) - slow.image.astype(np.int16))
        diffs.append(diff[content].mean() if content.any() else 0.0)
    return np.array(diffs)


def test_fused_rendering_matches_step_by_step_closely():
    # A sharp synthetic scene (worst case for interpolation differences).
    from dbnetpp.data.synthetic import SyntheticText

    sample = SyntheticText(1, (360, 640), seed=3)[0]
    diffs = fused_vs_reference(sample["image"], sample["polygons"], sample["ignore"], range(6))
    assert len(diffs) >= 4
    assert diffs.mean() < 2.0 and diffs.max() < 3.0  # grey levels, over the image content (~0.8 measured)


def test_fused_rendering_on_real_images(icdar_root):
    from dbnetpp.data import ICDAR2015

    dataset = ICDAR2015(icdar_root, "test")
    diffs = np.concatenate([
        fused_vs_reference(s["image"], s["polygons"], s["ignore"], range(2)) for s in (dataset[0], dataset[7])
    ])
    assert diffs.mean() < 1.5


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        T.adjust_brightness(np.zeros((4, 4), np.uint8), 1.0)
    with pytest.raises(ValueError, match="polygon 1"):
        T.train_transform(np.zeros((8, 8, 3), np.uint8), [np.zeros((4, 2)), np.zeros((3, 3))], None,
                          np.random.default_rng(0))
    with pytest.raises(ValueError, match="ignore has 1 flags for 2 polygons"):
        T.train_transform(np.zeros((8, 8, 3), np.uint8), [np.zeros((4, 2))] * 2, [True], np.random.default_rng(0))


def test_min_side_ratio_bounds_how_much_text_is_enlarged():
    """The crop (at least ``r`` x the rescaled side) is resized to ``size``: text grows at most
    ``size / (r * side)`` times against the source image, whatever the imgaug rescale drew."""
    rng_image = np.random.default_rng(0)
    image = rng_image.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    polygons = [np.array([[x, y], [x + 20, y], [x + 20, y + 10], [x, y + 10]], np.float32)
                for x in range(10, 230, 40) for y in range(10, 240, 30)]  # fmt: skip
    source_area = 20 * 10

    def largest_growth(ratio, seed):
        out = T.train_transform(image, polygons, None, np.random.default_rng(seed), 256, True, ratio)
        return max(Polygon(p).area for p in out.polygons) / source_area if out and out.polygons else 0.0

    bounded = [largest_growth(0.5, seed) for seed in range(40)]
    assert max(bounded) <= (256 / (0.5 * 256)) ** 2 * 1.05  # at most 2x per side (+ rounding)
    assert max(largest_growth(0.1, seed) for seed in range(40)) > 4.5  # MMOCR's 0.1 zooms further
    with pytest.raises(ValueError, match="min_side_ratio"):
        from dbnetpp.data import TrainDataset

        TrainDataset([{"image": image, "polygons": polygons, "ignore": [False] * len(polygons)}], min_side_ratio=0)

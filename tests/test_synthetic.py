import cv2
import numpy as np
import pytest
from shapely.geometry import Polygon

from dbnetpp.data import ICDAR2015, SyntheticText


def fill(polygons, height, width):
    """Raster of polygons in continuous pixel coordinates (pixel centre = index + 0.5)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for poly in polygons:
        cv2.fillPoly(mask, [np.round((poly - 0.5) * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    return mask.astype(bool)


@pytest.fixture(scope="module")
def samples():
    dataset = SyntheticText(12, (320, 480), seed=7)
    return [dataset.generate(i, with_text_mask=True) for i in range(len(dataset))]


def test_sample_format(samples):
    for i, sample in enumerate(samples):
        assert sample["image"].shape == (320, 480, 3) and sample["image"].dtype == np.uint8
        assert sample["ori_size"] == (320, 480)
        assert sample["path"].endswith(f"img_{i + 1}.png")
        n = len(sample["polygons"])
        assert len(sample["texts"]) == n and sample["ignore"].shape == (n,) and sample["ignore"].dtype == bool
        for poly, text, ignored in zip(sample["polygons"], sample["texts"], sample["ignore"]):
            assert poly.shape == (4, 2) and poly.dtype == np.float32
            assert (text == "###") == ignored
            if not ignored:
                assert 3 <= len(text) <= 10 and text.isalnum()
    assert sum(len(s["polygons"]) for s in samples) >= 3 * len(samples)


def test_samples_depend_only_on_seed_and_index():
    a = SyntheticText(6, 200, seed=3)
    b = SyntheticText(50, 200, seed=3)  # other length, other access order
    c = SyntheticText(6, 200, seed=4)
    late, early = a[5], a[1]
    for x, y in ((late, b[5]), (early, b[1])):
        assert np.array_equal(x["image"], y["image"])
        assert x["texts"] == y["texts"]
        assert all(np.array_equal(p, q) for p, q in zip(x["polygons"], y["polygons"]))
    assert not np.array_equal(a[1]["image"], c[1]["image"])
    assert not np.array_equal(a[1]["image"], a[2]["image"])
    cached = SyntheticText(6, 200, seed=3, cache=True)
    first = cached[5]
    with pytest.raises(ValueError, match="read-only"):
        first["image"][:] = 0  # cached arrays are shared: read-only
    first["polygons"].clear()  # the lists are the caller's own
    assert np.array_equal(cached[5]["image"], late["image"]) and len(cached[5]["polygons"]) == len(late["polygons"])
    assert np.array_equal(SyntheticText(6, 200, seed=3)[-1]["image"], late["image"])
    with pytest.raises(IndexError):
        a[6]


def test_boxes_are_inside_clockwise_and_do_not_overlap(samples):
    for sample in samples:
        polys = sample["polygons"]
        for poly in polys:
            assert np.array_equal(poly, np.round(poly))  # ICDAR-style integer corners
            assert poly[:, 0].min() >= 0 and poly[:, 0].max() <= 480
            assert poly[:, 1].min() >= 0 and poly[:, 1].max() <= 320
            x, y = poly[:, 0].astype(np.float64), poly[:, 1].astype(np.float64)
            # clockwise on screen (y down) = positive shoelace sum
            assert np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) > 0
            assert Polygon(poly).is_valid
            # first corner is the word's top-left: nearest the top-left of the box's rotated frame
            assert poly[0, 0] < poly[1, 0] or poly[0, 1] > poly[1, 1]
        shapes = [Polygon(p) for p in polys]
        for i in range(len(shapes)):
            for j in range(i + 1, len(shapes)):
                assert shapes[i].intersection(shapes[j]).area == 0


def test_boxes_cover_the_drawn_text(samples):
    for sample in samples:
        height, width = sample["image"].shape[:2]
        ink = sample["text_mask"] >= 128
        boxes = fill(sample["polygons"], height, width)
        assert not np.any(ink & ~boxes), "text pixels outside every box"
        for poly in sample["polygons"]:  # and every box holds ink
            assert np.any(ink & fill([poly], height, width))


def test_text_is_visible_in_the_image(samples):
    # where the cared-for words are drawn the image differs from its surroundings
    for sample in samples:
        gray = cv2.cvtColor(sample["image"], cv2.COLOR_BGR2GRAY).astype(np.float32)
        for poly, ignored in zip(sample["polygons"], sample["ignore"]):
            inside = fill([poly], *gray.shape) & (sample["text_mask"] > 0)
            if not ignored and inside.sum() > 30:
                assert gray[inside].std() > 3.0


def test_about_one_word_in_ten_is_ignored():
    dataset = SyntheticText(40, 640, seed=0)
    ignore = np.concatenate([dataset[i]["ignore"] for i in range(len(dataset))])
    assert len(ignore) > 200
    assert 0.04 < ignore.mean() < 0.2


@pytest.mark.parametrize("split", ["train", "test"])
def test_write_icdar_round_trip(tmp_path, split):
    dataset = SyntheticText(3, (96, 160), seed=5)
    dataset.write_icdar(tmp_path, split)
    loaded = ICDAR2015(tmp_path, split)
    assert len(loaded) == 3
    gt_dir = "ch4_training_localization_transcription_gt" if split == "train" else "Challenge4_Test_Task1_GT"
    raw = (tmp_path / gt_dir / "gt_img_1.txt").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") == (split == "train")
    assert raw.count(b"\r\n") == len(dataset[0]["polygons"])
    for i in range(3):
        original, back = dataset[i], loaded[i]
        assert np.array_equal(original["image"], back["image"])
        assert original["texts"] == back["texts"]
        assert np.array_equal(original["ignore"], back["ignore"])
        assert len(original["polygons"]) == len(back["polygons"])
        for p, q in zip(original["polygons"], back["polygons"]):
            assert np.array_equal(p, q)
        assert back["path"].endswith(f"img_{i + 1}.png") and back["ori_size"] == original["ori_size"]


def test_write_icdar_jpeg(tmp_path):
    dataset = SyntheticText(2, 128, seed=1)
    dataset.write_icdar(tmp_path, "train", image_format="jpg")
    back = ICDAR2015(tmp_path, "train")[1]
    assert back["path"].endswith("img_2.jpg")
    assert np.abs(back["image"].astype(int) - dataset[1]["image"].astype(int)).mean() < 8  # lossy (4:2:0 chroma)
    with pytest.raises(ValueError, match="split"):
        dataset.write_icdar(tmp_path, "val")


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        SyntheticText(2, 8)
    with pytest.raises(ValueError, match="num_images"):
        SyntheticText(-1)

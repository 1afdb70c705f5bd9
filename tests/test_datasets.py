"""open_dataset: MMOCR's prepared layouts (Total-Text, SynthText, ICDAR 2015), FixInvalidPolygon, build_sources."""

import json

import cv2
import numpy as np
import pytest
from helpers import load_train_script
from shapely.geometry import Polygon

from dbnetpp.config import get_config
from dbnetpp.data import ICDAR2015, FixedPolygons, TextDetJSON, TrainDataset, open_dataset

BOWTIE = [0, 0, 10, 10, 10, 0, 0, 10]  # self-intersecting: invalid
CURVE = [0, 0, 8, -2, 16, 0, 24, 4, 24, 10, 16, 6, 8, 4, 0, 6]  # a valid 8-point Total-Text-like polygon


def write_prepared(root, split, entries, size=(40, 48)):
    """MMOCR's TextDetPacker JSON and its images; ``entries`` = list of instance lists."""
    rng = np.random.default_rng(len(entries))
    data_list = []
    for i, instances in enumerate(entries):
        rel = f"textdet_imgs/{split}/img_{i}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / rel), rng.integers(0, 256, size=(*size, 3), dtype=np.uint8))
        data_list.append({"img_path": rel, "height": size[0], "width": size[1], "instances": instances})
    meta = {"dataset_type": "TextDetDataset", "task_name": "textdet", "category": [{"id": 0, "name": "text"}]}
    (root / f"textdet_{split}.json").write_text(json.dumps({"metainfo": meta, "data_list": data_list}))


def inst(polygon, text="w", ignore=False):
    return {"polygon": polygon, "bbox": [0, 0, 1, 1], "bbox_label": 0, "ignore": ignore, "text": text}


@pytest.mark.parametrize("kind", ["totaltext", "synthtext", "icdar2015"])
def test_prepared_layout_for_every_kind(tmp_path, kind):
    write_prepared(tmp_path, "train", [[inst(CURVE, "curvy"), inst([1, 1, 5, 1, 5, 4, 1, 4], "###", True)], []])
    source = open_dataset(tmp_path, "train", kind)
    assert isinstance(source, ICDAR2015 if kind == "icdar2015" else TextDetJSON)
    assert len(source) == 2  # the image without text is kept: MMOCR's filter_cfg is a no-op in 1.0.1
    sample = source[0]
    np.testing.assert_array_equal(sample["polygons"][0], np.array(CURVE, dtype=np.float32).reshape(-1, 2))
    assert sample["texts"] == ["curvy", "###"] and sample["ignore"].tolist() == [False, True]
    assert sample["image"].shape == (40, 48, 3) and sample["ori_size"] == (40, 48)
    assert source[1]["polygons"] == [] and source[1]["ignore"].shape == (0,)


def test_totaltext_test_split_and_missing_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="textdet_test.json"):
        open_dataset(tmp_path, "test", "totaltext")
    write_prepared(tmp_path, "test", [[inst(CURVE)]])
    assert len(open_dataset(tmp_path, "test", "totaltext")) == 1
    with pytest.raises(ValueError, match="kind"):
        open_dataset(tmp_path, "test", "ctw1500")
    with pytest.raises(ValueError, match="split"):
        open_dataset(tmp_path, "val", "totaltext")


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"instances": []}, r"textdet_train\.json: data_list\[1\]: missing key 'img_path'"),
        ({"img_path": "a.png", "instances": [{"text": "x"}]}, r"data_list\[1\]\.instances\[0\]: missing key 'polygon'"),
        ({"img_path": "a.png", "instances": [inst([1, 2, 3, 4, 5])]}, r"instances\[0\]\.polygon: expected an even"),
        ({"img_path": "a.png", "instances": [inst([1, 2, "x", 4, 5, 6])]}, r"instances\[0\]\.polygon: not a list"),
        ({"img_path": "a.png", "instances": {"polygon": []}}, r"data_list\[1\]\.instances: expected a list"),
    ],
)
def test_malformed_entries_name_file_and_entry(tmp_path, entry, message):
    write_prepared(tmp_path, "train", [[inst(CURVE)]])
    data = json.loads((tmp_path / "textdet_train.json").read_text())
    data["data_list"].append(entry)
    (tmp_path / "textdet_train.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        open_dataset(tmp_path, "train", "totaltext")


def test_invalid_json_and_missing_image(tmp_path):
    (tmp_path / "textdet_train.json").write_text('{"data_list": [\n{"img_path": }]}')
    with pytest.raises(ValueError, match=r"textdet_train\.json:2: invalid JSON"):
        TextDetJSON(tmp_path, "train")
    write_prepared(tmp_path, "train", [[inst(CURVE)]])
    (tmp_path / "textdet_imgs/train/img_0.png").unlink()
    with pytest.raises(FileNotFoundError, match="img_0.png"):
        TextDetJSON(tmp_path, "train")
    lazy = TextDetJSON(tmp_path, "train", require_images=False)  # SynthText-sized sets: checked when read
    with pytest.raises(FileNotFoundError, match="img_0.png"):
        lazy[0]


def test_fix_polygons_as_mmocr(tmp_path):
    """FixInvalidPolygon('fix', min_poly_points=4): invalid -> a valid ring; triangles -> re-ringed; valid kept."""
    write_prepared(tmp_path, "test", [[inst(BOWTIE, "bow"), inst([0, 0, 9, 0, 4, 7], "tri"), inst(CURVE, "ok", True)]])
    raw = open_dataset(tmp_path, "test", "totaltext")
    fixed = open_dataset(tmp_path, "test", "totaltext", fix_polygons=4)
    assert isinstance(fixed, FixedPolygons) and len(fixed) == 1 and fixed.split == "test"
    before, after = raw[0], fixed[0]
    assert not Polygon(before["polygons"][0]).is_valid
    assert all(Polygon(p).is_valid and len(p) >= 4 for p in after["polygons"])
    assert after["texts"] == ["bow", "tri", "ok"] and after["ignore"].tolist() == [False, False, True]
    np.testing.assert_array_equal(after["polygons"][2], before["polygons"][2])  # valid, >= 4 points: untouched
    # the triangle's ring: its 3 corners plus the repeated closing point, same area
    assert Polygon(after["polygons"][1]).area == pytest.approx(Polygon(before["polygons"][1]).area)
    assert len(after["polygons"][1]) == 4
    # the bow-tie's fix covers the two triangles of the crossing (area 25 each) or their hull
    assert Polygon(after["polygons"][0]).area >= 25 - 1e-6
    assert np.array_equal(fixed.load_annotations(0)["ignore"], after["ignore"])


def test_fixed_polygons_drops_degenerate_with_labels():
    source = [{"image": np.zeros((8, 8, 3), np.uint8), "polygons": [np.zeros((2, 2), np.float32),
               np.array([[0, 0], [4, 0], [4, 4], [0, 4]], np.float32)], "ignore": [True, False], "texts": ["a", "b"]}]
    out = FixedPolygons(source, 4)[0]
    assert out["texts"] == ["b"] and out["ignore"].tolist() == [False] and len(out["polygons"]) == 1
    with pytest.raises(ValueError, match="min_poly_points"):
        FixedPolygons(source, 2)


def test_train_dataset_runs_on_fixed_totaltext(tmp_path):
    write_prepared(tmp_path, "train", [[inst(BOWTIE), inst(CURVE)]], size=(64, 64))
    item = TrainDataset(open_dataset(tmp_path, "train", "totaltext", fix_polygons=4), size=64)[0]
    assert item["image"].shape == (3, 64, 64) and item["shrink_map"].shape == (64, 64)


def _train_script():
    return load_train_script("dbnetpp_train_script_datasets")


def test_build_sources_follows_the_recipe(tmp_path):
    script = _train_script()
    info = script.dist_utils.DistInfo if hasattr(script.dist_utils, "DistInfo") else None
    write_prepared(tmp_path, "train", [[inst(CURVE)]])
    write_prepared(tmp_path, "test", [[inst(BOWTIE)]])
    cfg = get_config("dbnet_resnet18_fpnc_1200e_totaltext", data={"root": str(tmp_path)})
    train, test = script.build_sources(cfg, info, train=True)
    assert isinstance(train, FixedPolygons) and isinstance(test, FixedPolygons)
    assert Polygon(test[0]["polygons"][0]).is_valid  # Total-Text's test pipeline fixes the ground truth too
    cfg = get_config("dbnet_resnet18_fpnc_100k_synthtext", data={"root": str(tmp_path)})
    train, test = script.build_sources(cfg, info, train=True)
    assert isinstance(train, FixedPolygons) and isinstance(train.source, TextDetJSON) and list(test) == []


def test_pipeline_option_equals_source_option_and_is_idempotent(tmp_path):
    from dbnetpp.data import TestDataset

    write_prepared(tmp_path, "train", [[inst(BOWTIE), inst([0, 0, 30, 0, 15, 20]), inst(CURVE)]], size=(64, 64))
    raw = open_dataset(tmp_path, "train", "totaltext")
    fixed = open_dataset(tmp_path, "train", "totaltext", fix_polygons=4)
    a = TrainDataset(raw, size=64, fix_polygons=4)[0]
    b = TrainDataset(fixed, size=64)[0]
    c = TrainDataset(fixed, size=64, fix_polygons=4)[0]  # fixing fixed polygons changes nothing
    for key in a:
        assert np.array_equal(a[key], b[key]) and np.array_equal(b[key], c[key]), key
    t = TestDataset(raw, scale=(64, 64), fix_polygons=4)[0]
    assert all(np.array_equal(p, q) for p, q in zip(t["polygons"], fixed[0]["polygons"]))
    assert len(t["polygons"]) == 3

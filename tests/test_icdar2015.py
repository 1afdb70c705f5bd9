import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from dbnetpp.data.icdar2015 import ICDAR2015, natural_key, parse_gt_file, read_image

TEST_GT = "Challenge4_Test_Task1_GT"
TRAIN_GT = "ch4_training_localization_transcription_gt"


def raw_records(path: Path):
    """(8 coordinates, transcription) per non-empty line, read independently of the loader."""
    text = path.read_bytes().decode("utf-8")
    text = text[1:] if text.startswith("\ufeff") else text
    records = []
    for line in re.split(r"\r\n|\n", text):
        line = line.strip()
        if line:
            match = re.fullmatch(r"((?:[^,]*,){8})(.*)", line)
            records.append(([float(v) for v in match.group(1).rstrip(",").split(",")], match.group(2)))
    return records


def write_gt(path: Path, lines, bom: bool = False, newline: str = "\r\n") -> None:
    data = newline.join(lines) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data.encode("utf-8"))


def make_official(root: Path, split: str = "test", num: int = 3, size=(40, 60)):
    image_dir = root / ("ch4_test_images" if split == "test" else "ch4_training_images")
    gt_dir = root / (TEST_GT if split == "test" else TRAIN_GT)
    image_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {}
    for n in range(1, num + 1):
        image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        cv2.imwrite(str(image_dir / f"img_{n}.png"), image)
        images[n] = image
        write_gt(gt_dir / f"gt_img_{n}.txt", [f"1,2,{10 + n},2,{10 + n},9,1,9,word{n}", "3,3,8,3,8,7,3,7,###"])
    return image_dir, gt_dir, images


# ----------------------------------------------------------------------------------- real data


def image_numbers(folder: Path):
    """The N of every img_N.jpg in a folder, sorted numerically (read without the loader)."""
    return sorted(int(re.fullmatch(r"img_(\d+)\.jpg", p.name).group(1)) for p in folder.glob("img_*.jpg"))


def raw_counts(gt_dir: Path):
    """(boxes, ignored "###" boxes) over every gt_img_N.txt in a folder, with the raw reader."""
    records = [r for path in gt_dir.glob("gt_img_*.txt") for r in raw_records(path)]
    return len(records), sum(text == "###" for _, text in records)


def test_real_test_split(icdar_root):
    """Counts derived from the files (the 100-image sample and the full 500-image set both pass)."""
    dataset = ICDAR2015(icdar_root, "test")
    numbers = image_numbers(icdar_root / "ch4_test_images")
    assert len(numbers) > 0 and len(dataset) == len(numbers)
    assert [p.name for p in dataset.image_paths] == [f"img_{n}.jpg" for n in numbers]
    boxes = sum(len(a["polygons"]) for a in dataset.annotations)
    ignored = sum(int(a["ignore"].sum()) for a in dataset.annotations)
    gt_files = [icdar_root / TEST_GT / f"gt_img_{n}.txt" for n in numbers]
    records = [r for path in gt_files for r in raw_records(path)]
    assert (boxes, ignored) == (len(records), sum(text == "###" for _, text in records))
    assert 0 < ignored < boxes
    sample = dataset[numbers.index(10)] if 10 in numbers else dataset[0]
    assert sample["path"].endswith(f"img_{10 if 10 in numbers else numbers[0]}.jpg")
    assert sample["image"].shape == (720, 1280, 3) and sample["image"].dtype == np.uint8  # every ICDAR 2015 image
    assert sample["ori_size"] == (720, 1280)
    assert len(sample["polygons"]) == len(sample["texts"]) == len(sample["ignore"])
    assert all(p.shape == (4, 2) and p.dtype == np.float32 for p in sample["polygons"])
    assert np.array_equal(sample["ignore"], np.array([t == "###" for t in sample["texts"]]))
    expected = cv2.imread(sample["path"], cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert np.array_equal(sample["image"], expected)


def test_real_train_annotations(icdar_root):
    """Training annotations with or without the training images (the sample ships none)."""
    has_images = (icdar_root / "ch4_training_images").is_dir()
    if not has_images:
        with pytest.raises(FileNotFoundError, match="ch4_training_images"):
            ICDAR2015(icdar_root, "train")
    dataset = ICDAR2015(icdar_root, "train", require_images=False)
    gt_dir = icdar_root / TRAIN_GT
    numbers = sorted(int(re.fullmatch(r"gt_img_(\d+)\.txt", p.name).group(1)) for p in gt_dir.glob("gt_img_*.txt"))
    assert len(dataset) == len(numbers) > 0
    assert [p.name for p in dataset.image_paths] == [f"img_{n}.jpg" for n in numbers]  # natural order
    boxes = sum(len(a["polygons"]) for a in dataset.annotations)
    ignored = sum(int(a["ignore"].sum()) for a in dataset.annotations)
    assert (boxes, ignored) == raw_counts(gt_dir)
    if numbers[0] == 1:  # the official gt_img_1.txt (a fact of the data set, not of the sample)
        ann = dataset.load_annotations(0)
        assert ann["texts"][0] == "Genaxis Theatre"  # the first line of the file follows the BOM
        np.testing.assert_array_equal(ann["polygons"][0], [[377, 117], [463, 117], [465, 130], [378, 130]])
    if has_images:
        assert dataset[0]["image"].ndim == 3
    else:
        with pytest.raises(FileNotFoundError, match=dataset.image_paths[0].name):
            dataset[0]


@pytest.mark.parametrize("split, gt_folder", [("test", TEST_GT), ("train", TRAIN_GT)])
def test_real_transcriptions_match_raw_lines(icdar_root, split, gt_folder):
    dataset = ICDAR2015(icdar_root, split, require_images=False)
    with_commas = 0
    for i in range(len(dataset)):
        gt_path = icdar_root / gt_folder / f"gt_{dataset.image_paths[i].stem}.txt"
        records = raw_records(gt_path)
        ann = dataset.load_annotations(i)
        assert ann["texts"] == [text for _, text in records], gt_path
        for poly, (coords, _) in zip(ann["polygons"], records):
            assert poly.reshape(-1).tolist() == coords
        with_commas += sum("," in text for _, text in records)
        # independent count: a line with more than 8 commas has a comma in its transcription
        raw_lines = [ln for ln in gt_path.read_bytes().decode("utf-8-sig").splitlines() if ln.strip()]
        assert sum("," in text for _, text in records) == sum(ln.count(",") > 8 for ln in raw_lines), gt_path
    if split == "test":  # the test set has transcriptions with commas (3 in the 100-image sample)
        assert with_commas > 0


# ------------------------------------------------------------------------------ parsing rules


def test_parse_bom_crlf_commas_and_blank_lines(tmp_path):
    lines = ["1,2,3,4,5,6,7,8,plain", "  ", "10,20,30,20,30,40,10,40,a,b,,c", "0,0,5,0,5,5,0,5,###", ""]
    for bom in (False, True):
        for newline in ("\r\n", "\n"):
            path = tmp_path / f"gt_{bom}_{len(newline)}.txt"
            write_gt(path, lines, bom=bom, newline=newline)
            gt = parse_gt_file(path)
            assert gt["texts"] == ["plain", "a,b,,c", "###"]
            assert gt["ignore"].tolist() == [False, False, True]
            np.testing.assert_array_equal(gt["polygons"][1], [[10, 20], [30, 20], [30, 40], [10, 40]])
            assert gt["polygons"][0].dtype == np.float32


def test_parse_text_keeps_inner_spaces_and_hash_variants(tmp_path):
    path = tmp_path / "gt.txt"
    write_gt(path, ["1,1,9,1,9,9,1,9, two words ", "1,1,9,1,9,9,1,9,####", "1,1,9,1,9,9,1,9,"])
    gt = parse_gt_file(path)
    assert gt["texts"] == [" two words", "####", ""]  # lines are stripped, fields are not
    assert gt["ignore"].tolist() == [False, False, False]  # only exactly '###' is ignored


@pytest.mark.parametrize(
    "bad, message",
    [("1,2,3,4,5,6,7", "7 comma-separated fields"), ("1,2,3,x4,5,6,7,8,t", "'x4'"), ("1,2,3,nan,5,6,7,8,t", "'nan'")],
)
def test_parse_rejects_malformed_lines_with_file_and_line(tmp_path, bad, message):
    path = tmp_path / "gt_img_7.txt"
    write_gt(path, ["1,2,3,4,5,6,7,8,ok", "", bad])
    with pytest.raises(ValueError, match=re.escape("gt_img_7.txt:3: ") + ".*" + re.escape(message)):
        parse_gt_file(path)


def test_natural_order():
    names = ["img_10.jpg", "img_2.jpg", "img_1.jpg", "img_100.jpg"]
    assert sorted(names, key=natural_key) == ["img_1.jpg", "img_2.jpg", "img_10.jpg", "img_100.jpg"]


# ----------------------------------------------------------------------------- folder layouts


def test_official_layout_round_trip(tmp_path):
    make_official(tmp_path, "test", num=12)
    dataset = ICDAR2015(tmp_path, "test")
    assert len(dataset) == 12 and dataset.layout == "official"
    assert [p.stem for p in dataset.image_paths[:3]] == ["img_1", "img_2", "img_3"]
    sample = dataset[10]
    assert sample["texts"] == ["word11", "###"] and sample["ignore"].tolist() == [False, True]
    np.testing.assert_array_equal(sample["polygons"][0], [[1, 2], [21, 2], [21, 9], [1, 9]])
    assert sample["image"].shape == (40, 60, 3) and sample["ori_size"] == (40, 60)


def test_image_without_ground_truth_fails_at_construction(tmp_path):
    _, gt_dir, _ = make_official(tmp_path, "test", num=3)
    (gt_dir / "gt_img_2.txt").unlink()
    with pytest.raises(FileNotFoundError, match="gt_img_2.txt"):
        ICDAR2015(tmp_path, "test")


def test_undecodable_and_missing_image(tmp_path):
    image_dir, _, _ = make_official(tmp_path, "test", num=3)
    (image_dir / "img_2.png").write_bytes(b"this is not an image")
    dataset = ICDAR2015(tmp_path, "test")
    dataset[0]
    with pytest.raises(ValueError, match="img_2.png"):
        dataset[1]
    (image_dir / "img_3.png").unlink()
    with pytest.raises(FileNotFoundError, match="img_3.png"):
        dataset[2]
    with pytest.raises(FileNotFoundError, match="img_3.png"):
        read_image(image_dir / "img_3.png")


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="textdet_test.json.*Challenge4_Test_Task1_GT"):
        ICDAR2015(tmp_path, "test")
    (tmp_path / "Challenge4_Test_Task4_GT").mkdir()
    write_gt(tmp_path / "Challenge4_Test_Task4_GT" / "gt_img_1.txt", ["1,1,9,1,9,9,1,9,x"])
    with pytest.raises(FileNotFoundError, match="ch4_test_images"):
        ICDAR2015(tmp_path, "test")
    assert len(ICDAR2015(tmp_path, "test", require_images=False)) == 1
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ICDAR2015(tmp_path / "nowhere", "test")
    with pytest.raises(ValueError, match="split"):
        ICDAR2015(tmp_path, "val")


def test_mmocr_json_layout_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "textdet_imgs" / "test").mkdir(parents=True)
    entries, images = [], []
    for n in (1, 2):
        image = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
        rel = f"textdet_imgs/test/img_{n}.png"
        cv2.imwrite(str(tmp_path / rel), image)
        images.append(image)
        instances = [
            {"polygon": [1.5, 2, 20, 2, 20, 10, 1.5, 10], "bbox": [1.5, 2, 20, 10], "bbox_label": 0, "ignore": False},
            {"polygon": [3, 3, 9, 3, 9, 8, 3, 8, 2, 6], "bbox": [2, 3, 9, 8], "bbox_label": 0, "ignore": True},
        ]
        entries.append({"img_path": rel, "height": 30, "width": 50, "instances": instances[:n]})
    meta = {"dataset_type": "TextDetDataset", "task_name": "textdet", "category": [{"id": 0, "name": "text"}]}
    (tmp_path / "textdet_test.json").write_text(json.dumps({"metainfo": meta, "data_list": entries}))

    dataset = ICDAR2015(tmp_path, "test")
    assert dataset.layout == "mmocr" and len(dataset) == 2
    sample = dataset[1]
    assert np.array_equal(sample["image"], images[1])
    assert sample["ignore"].tolist() == [False, True]
    np.testing.assert_array_equal(sample["polygons"][0], [[1.5, 2], [20, 2], [20, 10], [1.5, 10]])
    assert sample["polygons"][1].shape == (5, 2)
    assert sample["path"] == str(tmp_path / "textdet_imgs/test/img_2.png")

    entries[0]["instances"][0]["polygon"] = [1, 2, 3]
    (tmp_path / "textdet_test.json").write_text(json.dumps({"metainfo": meta, "data_list": entries}))
    with pytest.raises(ValueError, match=r"data_list\[0\]\.instances\[0\]\.polygon"):
        ICDAR2015(tmp_path, "test")


def test_samples_are_copies(tmp_path):
    make_official(tmp_path, "test", num=1)
    dataset = ICDAR2015(tmp_path, "test")
    first = dataset[0]
    first["polygons"][0][:] = -1
    first["ignore"][:] = True
    again = dataset.load_annotations(0)
    assert again["polygons"][0].min() >= 0 and not again["ignore"][0]

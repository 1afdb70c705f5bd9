"""SynthText's official release (gt.mat + image folders), on a small gt.mat the test writes."""

import builtins

import cv2
import numpy as np
import pytest

from dbnetpp.data import SynthText, open_dataset
from dbnetpp.data.synthtext import load_gt_mat

sio = pytest.importorskip("scipy.io", reason="the synthtext extra (scipy) is not installed")


def cells(values):
    out = np.empty((1, len(values)), dtype=object)
    for i, v in enumerate(values):
        out[0, i] = v
    return out


def make_release(root, boxes, lines, names=None):
    """Images 'k/img_i.jpg' and a gt.mat in the official layout: 1 x N cells, wordBB 2 x 4 (x K)."""
    names = names or [f"{i % 2 + 1}/img_{i}.jpg" for i in range(len(boxes))]
    images = []
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
        cv2.imwrite(str(root / name), image, [cv2.IMWRITE_JPEG_QUALITY, 100])
        images.append(cv2.imread(str(root / name)))
    sio.savemat(
        str(root / "gt.mat"),
        {"imnames": cells([np.array([n]) for n in names]), "wordBB": cells(boxes), "txt": cells(lines)},
    )
    return names, images


def quad(x0, y0, w, h):
    """2 x 4 (x row, y row), clockwise from the top-left, as SynthText stores a word box."""
    return np.array([[x0, x0 + w, x0 + w, x0], [y0, y0, y0 + h, y0 + h]], dtype=np.float64)


def test_reads_words_boxes_and_images(tmp_path):
    three = np.stack([quad(1, 2, 5, 3), quad(10.5, 4, 6, 2), quad(3, 12, 8, 4)], axis=2)  # 2 x 4 x 3
    one = quad(2, 2, 9, 5)  # MATLAB's 2 x 4 for a single word
    lines = [np.array(["Hello  ", "big\nworld"]), np.array(["lonely"])]  # padded char matrix, newlines
    names, images = make_release(tmp_path, [three, one], lines)
    dataset = SynthText(tmp_path)
    assert len(dataset) == 2
    first = dataset[0]
    assert first["texts"] == ["Hello", "big", "world"]
    assert first["ignore"].tolist() == [False] * 3 and first["ignore"].dtype == bool
    for k in range(3):  # corner j of word k is (wordBB[0, j, k], wordBB[1, j, k])
        expected = np.array([[three[0, j, k], three[1, j, k]] for j in range(4)], dtype=np.float32)
        np.testing.assert_array_equal(first["polygons"][k], expected)
        assert first["polygons"][k].dtype == np.float32
    assert first["path"] == str(tmp_path / names[0])
    assert np.array_equal(first["image"], images[0]) and first["ori_size"] == (24, 32)
    second = dataset.load_annotations(1)
    assert second["texts"] == ["lonely"] and len(second["polygons"]) == 1
    np.testing.assert_array_equal(second["polygons"][0], one.T.astype(np.float32))
    assert "image" not in second


def test_open_dataset_reads_the_release_and_has_no_test_split(tmp_path):
    make_release(tmp_path, [quad(1, 1, 4, 4)], [np.array(["a"])])
    source = open_dataset(tmp_path, "train", "synthtext")
    assert isinstance(source, SynthText) and len(source) == 1
    with pytest.raises(FileNotFoundError, match="no test split"):
        open_dataset(tmp_path, "test", "synthtext")
    fixed = open_dataset(tmp_path, "train", "synthtext", fix_polygons=4)
    assert fixed.load_annotations(0)["texts"] == ["a"]


def test_word_count_mismatch_names_file_and_entry(tmp_path):
    two = np.stack([quad(1, 1, 4, 4)] * 2, axis=2)
    make_release(tmp_path, [quad(1, 1, 4, 4), two], [np.array(["a"]), np.array(["x"])])
    dataset = SynthText(tmp_path)
    dataset[0]  # a good entry is unaffected
    with pytest.raises(ValueError, match=r"gt\.mat: entry 1 \(img_1\.jpg\): 1 words in txt but 2 boxes"):
        dataset.load_annotations(1)


def test_bad_box_shape_and_missing_key(tmp_path):
    make_release(tmp_path, [np.zeros((3, 4, 1))], [np.array(["a"])])
    with pytest.raises(ValueError, match=r"entry 0 .*2x4xK"):
        SynthText(tmp_path).load_annotations(0)
    no_boxes = {"imnames": cells([np.array(["1/img_0.jpg"])]), "txt": cells([np.array(["a"])])}
    sio.savemat(str(tmp_path / "gt.mat"), no_boxes)
    with pytest.raises(ValueError, match=r"gt\.mat: no 'wordBB'"):
        SynthText(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="gt.mat"):
        SynthText(tmp_path)
    with pytest.raises(FileNotFoundError, match="textdet_train.json or gt.mat"):
        open_dataset(tmp_path, "train", "synthtext")
    make_release(tmp_path, [quad(1, 1, 4, 4)], [np.array(["a"])], names=["1/x.jpg"])
    (tmp_path / "1" / "x.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="x.jpg"):
        SynthText(tmp_path)


def test_without_scipy_names_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError("No module named 'scipy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    with pytest.raises(ImportError, match=r"dbnetpp\[synthtext\]"):
        load_gt_mat(tmp_path / "gt.mat")

import json
import math

import cv2
import numpy as np
import pytest

from dbnetpp.meters import JsonlLogger, SmoothedValue, curves_from_log, plot_curves, plot_log, read_jsonl


def test_smoothed_value_window_and_global_average():
    m = SmoothedValue(window=3)
    assert math.isnan(m.avg) and math.isnan(m.global_avg)
    for v in [1.0, 2.0, 3.0, 10.0]:
        m.update(v)
    assert m.avg == pytest.approx((2 + 3 + 10) / 3)
    assert m.global_avg == pytest.approx(16 / 4)
    assert m.value == 10.0
    m.update(4.0, n=4)  # a batch mean over 4 items weighs 4 in the global average
    assert m.global_avg == pytest.approx((16 + 16) / 8)


def test_jsonl_logger_appends_one_object_per_line(tmp_path):
    path = tmp_path / "run" / "log.jsonl"
    log = JsonlLogger(path)
    log.log({"type": "train", "loss": 1.5, "bad": float("nan"), "parts": (1, 2)})
    log.log({"type": "eval", "hmean": 0.5})
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0]) == {"type": "train", "loss": 1.5, "bad": None, "parts": [1, 2]}
    assert read_jsonl(path)[1] == {"type": "eval", "hmean": 0.5}
    JsonlLogger(None).log({"x": 1})  # disabled logger (ranks > 0) writes nothing


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(ValueError, match=r"log.jsonl:3"):
        read_jsonl(path)


def test_curves_from_log_uses_fractional_epochs_and_latest_records():
    records = [
        {"type": "train", "epoch": 0, "iter": 5, "iters": 10, "loss": 2.0},
        {"type": "train", "epoch": 0, "iter": 10, "iters": 10, "loss": 1.0},
        {"type": "eval", "epoch": 0, "hmean": 0.2},
        {"type": "train", "epoch": 1, "iter": 5, "iters": 10, "loss": 0.9},  # crashed, then resumed:
        {"type": "train", "epoch": 1, "iter": 5, "iters": 10, "loss": 0.8},
        {"type": "eval", "epoch": 1, "hmean": 0.6},
        {"type": "config"},
    ]
    loss, hmean = curves_from_log(records)
    assert loss == [(0.5, 2.0), (1.0, 1.0), (1.5, 0.8)]
    assert hmean == [(1.0, 0.2), (2.0, 0.6)]


def _colour_pixels(img, bgr):
    return np.all(np.abs(img.astype(int) - np.array(bgr)) < 40, axis=-1)


def test_plot_curves_writes_a_decodable_png_with_both_curves(tmp_path):
    path = tmp_path / "curves.png"
    loss = [(e / 4, 2.0 * math.exp(-e / 8)) for e in range(40)]
    hmean = [(e, min(0.95, 0.1 * e)) for e in range(1, 11)]
    image = plot_curves(loss, hmean, path, size=(800, 300))
    decoded = cv2.imread(str(path))
    assert decoded is not None and decoded.shape == (300, 800, 3)
    assert np.array_equal(decoded, image)
    left, right = decoded[:, :400], decoded[:, 400:]
    loss_colour, hmean_colour = (200, 80, 20), (40, 40, 200)
    assert _colour_pixels(left, loss_colour).sum() > 200 and _colour_pixels(left, hmean_colour).sum() == 0
    assert _colour_pixels(right, hmean_colour).sum() > 200 and _colour_pixels(right, loss_colour).sum() == 0
    # the loss falls: its curve starts high on the left and ends low on the right
    ys, xs = np.nonzero(_colour_pixels(left, loss_colour)[40:])  # below the title line
    assert ys[xs < xs.min() + 10].mean() < ys[xs > xs.max() - 10].mean()


def test_plot_log_with_no_evaluation_yet(tmp_path):
    log = tmp_path / "log.jsonl"
    JsonlLogger(log).log({"type": "train", "epoch": 0, "iter": 1, "iters": 1, "loss": 1.0})
    plot_log(log, tmp_path / "curves.png")
    assert cv2.imread(str(tmp_path / "curves.png")) is not None

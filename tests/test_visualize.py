"""dbnetpp.visualize: evaluation pictures coloured exactly as the metric scores them, the grid of
``examples/train.py`` (samples/epoch_N.jpg) and ``dbnetpp eval --vis``; each picture is read back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import load_train_script
from shapely.geometry import Polygon

from dbnetpp.data import SyntheticText
from dbnetpp.metric import DEFAULT_SCORE_THRS, HmeanIoU
from dbnetpp.visualize import COLORS, draw_evaluation, grid_cells, make_grid, save_evaluation_grid, save_image

ROOT = Path(__file__).resolve().parents[1]
BACKGROUND = (40, 40, 40)


def box(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)


def near_color(image, x, y, color, radius=2, tol=70):
    """Whether some pixel within ``radius`` of (x, y) is within ``tol`` (max abs per channel) of the BGR ``color``."""
    h, w = image.shape[:2]
    x, y = int(round(x)), int(round(y))
    patch = image[max(0, y - radius) : min(h, y + radius + 1), max(0, x - radius) : min(w, x + radius + 1)]
    return bool((np.abs(patch.astype(int) - np.array(color)).max(axis=-1) <= tol).any())


def edge_midpoints(polygon):
    p = np.asarray(polygon, np.float64).reshape(-1, 2)
    return (p + np.roll(p, -1, axis=0)) / 2


def scene():
    """One image with every case: matched, false positive, missed, ignored (with a detection inside)."""
    image = np.full((200, 300, 3), BACKGROUND, np.uint8)
    gts = [box(10, 10, 90, 40), box(10, 100, 90, 130), box(150, 150, 280, 190)]
    ignore = [False, False, True]
    preds = [box(12, 12, 88, 41), box(180, 20, 280, 60), box(160, 155, 270, 185), box(100, 60, 140, 80)]
    scores = [0.9, 0.8, 0.95, 0.1]  # the last is below every threshold
    return image, preds, scores, gts, ignore


# ----------------------------------------------------------------------------- metric.match


def random_image(rng):
    gts, ignore, preds, scores = [], [], [], []
    for _ in range(rng.integers(0, 6)):
        x, y, w, h = rng.uniform(0, 200), rng.uniform(0, 200), rng.uniform(5, 60), rng.uniform(5, 30)
        gts.append(box(x, y, x + w, y + h))
        ignore.append(bool(rng.random() < 0.3))
        if rng.random() < 0.8:  # a detection near it, sometimes good enough
            j = rng.normal(0, 0.2 * min(w, h), 4)
            preds.append(box(x + j[0], y + j[1], x + w + j[2], y + h + j[3]))
            scores.append(float(rng.uniform(0.2, 1.0)))
    for _ in range(rng.integers(0, 3)):
        x, y = rng.uniform(0, 200, 2)
        preds.append(box(x, y, x + 30, y + 15))
        scores.append(float(rng.uniform(0.2, 1.0)))
    return preds, np.array(scores, np.float32), gts, ignore


@pytest.mark.parametrize("strategy", ["vanilla", "max_matching"])
def test_match_agrees_with_metric_counts(strategy):
    """For random images and every threshold, match() finds as many pairs as update() counts hits,
    its false positives are the remaining counted predictions, and pairs really overlap > 0.5."""
    pytest.importorskip("scipy") if strategy == "max_matching" else None
    rng = np.random.default_rng(0)
    for _ in range(40):
        preds, scores, gts, ignore = random_image(rng)
        metric = HmeanIoU(strategy=strategy)
        metric.update(preds, scores, gts, ignore)
        for t, thr in enumerate(DEFAULT_SCORE_THRS):
            state = metric.match(preds, scores, gts, ignore, thr)
            assert len(state["pairs"]) == metric.hits[t]
            counted = state["pred"].count("matched") + state["pred"].count("false_positive")
            assert counted == metric.pred_nums[t]
            assert state["gt"].count("matched") + state["gt"].count("missed") == metric.gt_num
            for g, p in state["pairs"]:
                assert not ignore[g] and scores[p] >= np.float32(thr) - 1e-7
                assert state["gt"][g] == state["pred"][p] == "matched"
        assert metric.num_images == 1  # match() left the state alone


def test_match_states_of_each_case():
    image, preds, scores, gts, ignore = scene()
    state = HmeanIoU().match(preds, scores, gts, ignore)
    assert state["gt"] == ["matched", "missed", "ignored"]
    assert state["pred"] == ["matched", "false_positive", "ignored", "below_thr"]
    assert state["pairs"] == [(0, 0)]
    # a threshold above the matched score: it becomes below_thr and its ground truth missed
    state = HmeanIoU().match(preds, scores, gts, ignore, score_thr=0.92)
    assert state["gt"] == ["missed", "missed", "ignored"]
    assert state["pred"] == ["below_thr", "below_thr", "ignored", "below_thr"]
    assert state["pairs"] == []


# ----------------------------------------------------------------------------- drawing


def test_draw_evaluation_colours_where_the_boxes_are():
    image, preds, scores, gts, ignore = scene()
    picture, counts = draw_evaluation(image, preds, scores, gts, ignore)
    assert picture.shape == image.shape and picture.dtype == np.uint8
    assert (image == np.array(BACKGROUND, np.uint8)).all(), "the input is not drawn on"
    assert counts == {"matched": 1, "false_positive": 1, "missed": 1, "ignored_gt": 1}
    expect = [(preds[0], "matched"), (preds[1], "false_positive"), (gts[1], "missed"), (gts[2], "ignored")]
    for polygon, name in expect:
        for x, y in edge_midpoints(polygon):
            assert near_color(picture, x, y, COLORS[name], tol=10), (name, x, y)
        assert not near_color(picture, *polygon.mean(axis=0), COLORS[name], tol=10)  # outlines only
    # the false positive is not green and the missed box not red; nothing below the threshold is drawn
    fp_mid = edge_midpoints(preds[1])[0]
    assert not near_color(picture, *fp_mid, COLORS["matched"], radius=0, tol=10)
    assert not near_color(picture, *edge_midpoints(gts[1])[0], COLORS["false_positive"], radius=0, tol=10)
    for x, y in edge_midpoints(preds[3]):
        assert (picture[int(y), int(x)] == BACKGROUND).all()


def test_grid_layout_and_saved_jpeg(tmp_path):
    image, preds, scores, gts, ignore = scene()
    source = [{"image": image, "polygons": gts, "ignore": ignore}] * 3
    predictions = {2: (preds, scores), 0: ([], []), 1: (preds[:1], scores[:1])}
    path = save_evaluation_grid(tmp_path / "samples" / "epoch_3.jpg", source, predictions, score_thr=0.5, columns=2)
    grid = cv2.imread(str(path))
    (height, width), cells = grid_cells([image.shape[:2]] * 3, columns=2)
    assert grid.shape == (height, width, 3)
    assert height > 2 * image.shape[0] and width > 2 * image.shape[1]
    # index 0: no detections, so both cared boxes missed (yellow); index 2: matched, FP and missed
    expected = {
        0: [(gts[0], "missed"), (gts[1], "missed"), (gts[2], "ignored")],
        1: [(preds[0], "matched"), (gts[1], "missed")],
        2: [(preds[0], "matched"), (preds[1], "false_positive"), (gts[1], "missed")],
    }
    for k, items in expected.items():
        x0, y0, scale = cells[k]
        assert scale == 1.0
        for polygon, name in items:
            for x, y in edge_midpoints(polygon):
                assert near_color(grid, x0 + x, y0 + y, COLORS[name]), (k, name, x, y)
    assert not near_color(grid, cells[0][0] + edge_midpoints(gts[0])[0][0], cells[0][1] + 10, COLORS["matched"], 0)


def test_make_grid_scales_large_images_and_rejects_bad_input(tmp_path):
    big = np.zeros((1000, 2000, 3), np.uint8)
    big[400:600, 900:1100] = (0, 0, 255)
    (height, width), cells = grid_cells([big.shape[:2]], max_side=500)
    grid = make_grid([big], ["one"], max_side=500)
    assert grid.shape == (height, width, 3) and cells[0][2] == 0.25
    x0, y0, _ = cells[0]
    assert (grid[y0 + 125, x0 + 250] == (0, 0, 255)).all()
    with pytest.raises(ValueError, match="captions"):
        make_grid([big], ["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        make_grid([])
    with pytest.raises(ValueError, match="BGR uint8"):
        draw_evaluation(np.zeros((4, 4), np.uint8), [], [], [], [])
    with pytest.raises(ValueError, match="could not write"):
        save_image(tmp_path / "x.unknown", big)


# ----------------------------------------------------------------------------- train.py and the CLI


@pytest.mark.slow
def test_train_script_writes_epoch_samples(tmp_path, monkeypatch):
    """A micro run evaluating twice writes samples/epoch_1.jpg and epoch_2.jpg: the first 4 held-out
    images with the detections its evaluation made, as ``save_evaluation_grid`` draws them (whose
    colours are checked on known detections above). Nothing here depends on what the model learnt."""
    module = load_train_script("dbnetpp_train_script_vis")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train_script import MICRO

    calls = []
    original = module.save_evaluation_grid

    def spy(path, source, predictions, score_thr=None, **kwargs):
        calls.append((Path(path), source, {i: (list(p), list(s)) for i, (p, s) in predictions.items()}, score_thr))
        return original(path, source, predictions, score_thr, **kwargs)

    monkeypatch.setattr(module, "save_evaluation_grid", spy)
    work = tmp_path / "run"
    args = module.get_args_parser().parse_args([*MICRO, "--epochs", "2", "--work-dir", str(work), "--threads", "1"])
    module.main(args)
    cfg = module.config_from_args(args)
    held_out = SyntheticText(
        cfg.data.synthetic_test_images, size=cfg.data.synthetic_size, seed=cfg.data.synthetic_test_seed,
        words_per_image=tuple(cfg.data.synthetic_words),
    )
    samples = [held_out[i] for i in range(min(4, len(held_out)))]
    (height, width), _ = grid_cells([s["image"].shape[:2] for s in samples])
    assert [c[0] for c in calls] == [work / "samples" / f"epoch_{n}.jpg" for n in (1, 2)]
    for n, (path, source, predictions, score_thr) in enumerate(calls, 1):
        assert sorted(predictions) == list(range(len(samples)))
        for i, sample in enumerate(samples):  # the held-out images themselves, with their ground truth
            np.testing.assert_array_equal(source[i]["image"], sample["image"])
            assert len(source[i]["polygons"]) == len(sample["polygons"])
            polygons, scores = predictions[i]
            assert len(polygons) == len(scores) and all(0 <= sc <= 1 for sc in scores)
        assert score_thr is None or score_thr in DEFAULT_SCORE_THRS
        written = cv2.imread(str(path))
        assert written is not None and written.shape == (height, width, 3)
        # the file is that drawing: redrawn from the same inputs, it decodes to the same pixels
        again = save_evaluation_grid(tmp_path / f"again_{n}.jpg", source, predictions, score_thr)
        np.testing.assert_array_equal(cv2.imread(str(again)), written)


def _write_results(folder, detections):
    folder.mkdir(parents=True, exist_ok=True)
    for stem, polygons in detections.items():
        lines = [",".join(str(int(round(v))) for v in np.asarray(p).reshape(-1)) + ",0.9" for p in polygons]
        (folder / f"res_{stem}.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_cli_eval_vis(tmp_path):
    """``dbnetpp eval --vis DIR`` with known detections: on img_1 every ground-truth text found (green)
    plus a false positive (red), on img_2 nothing found (yellow). One picture per image, the image's
    size, each colour where the metric puts it. Then the same with a model (``--weights``): the
    pictures are written whatever it detects."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_detector import synthetic_set

    from dbnetpp.data import ICDAR2015

    root = synthetic_set(2).write_icdar(tmp_path / "icdar", "test")
    dataset = ICDAR2015(root, "test")
    samples = [dataset[i] for i in range(len(dataset))]
    first = samples[0]
    cared = [p for p, ignored in zip(first["polygons"], first["ignore"]) if not ignored]
    false_positive = box(2, 2, 20, 12)
    assert all(Polygon(p).intersection(Polygon(false_positive)).area == 0 for p in first["polygons"])
    preds = tmp_path / "preds"
    _write_results(preds, {"img_1": [*cared, false_positive], "img_2": []})

    def run_eval(*extra):
        vis = tmp_path / f"vis{len(extra)}"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        proc = subprocess.run(
            [sys.executable, "-m", "dbnetpp.cli", "eval", "--data", str(root), "--vis", str(vis), *extra],
            capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        record = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
        assert record["vis"] == str(vis)
        assert sorted(p.name for p in vis.iterdir()) == ["vis_img_1.jpg", "vis_img_2.jpg"]
        pictures = [cv2.imread(str(vis / f"vis_img_{i + 1}.jpg")) for i in range(2)]
        assert [p.shape for p in pictures] == [s["image"].shape for s in samples]
        return record, pictures

    record, (one, two) = run_eval("--predictions", str(preds))
    cared_two = [p for p, ignored in zip(samples[1]["polygons"], samples[1]["ignore"]) if not ignored]
    assert record["recall"] == pytest.approx(len(cared) / (len(cared) + len(cared_two)))
    assert record["precision"] == pytest.approx(len(cared) / (len(cared) + 1))

    def share(picture, polygons, color):
        hits = [near_color(picture, x, y, COLORS[color]) for p in polygons for x, y in edge_midpoints(p)]
        return np.mean(hits), len(hits)

    for picture, polygons, color in ((one, cared, "matched"), (one, [false_positive], "false_positive"),
                                     (two, cared_two, "missed")):  # fmt: skip
        found, count = share(picture, polygons, color)
        assert count >= 4 and found >= 0.9, (color, found, count)

    # a model's detections (random weights: whatever they are) are drawn too
    weights = tmp_path / "random_tiny.pth"
    import torch

    from dbnetpp.models.dbnet import build_model

    torch.save({"state_dict": build_model("dbnet_resnet18_tiny").state_dict()}, weights)
    record, _ = run_eval("--weights", str(weights), "--model", "dbnet_resnet18_tiny")
    assert record["weights"] == str(weights)

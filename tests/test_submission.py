import os
import zipfile

import cv2
import numpy as np
import pytest

from dbnetpp.submission import to_clockwise_quad, write_submission


def parse(path):
    quads = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            values = [int(v) for v in line.strip().split(",")[:8]]
            quads.append(np.array(values).reshape(4, 2))
    return quads


def clockwise_on_screen(quad):
    # the official script's test: sum over edges of (x2 - x1) * (y2 + y1) must be <= 0
    q = np.asarray(quad, np.int64)
    nxt = np.roll(q, -1, axis=0)
    return np.sum((nxt[:, 0] - q[:, 0]) * (nxt[:, 1] + q[:, 1])) < 0


def same_cycle(a, b):
    return any(np.array_equal(np.roll(a, k, axis=0), b) for k in range(4))


def test_round_trip(tmp_path):
    rotated = cv2.boxPoints(((300.4, 200.7), (120.2, 30.6), 25.0))
    results = {
        "img_1.jpg": ([rotated, rotated[::-1].copy()], [0.9, 0.8]),  # clockwise and counter-clockwise
        "/some/dir/img_7.jpg": ([np.array([[10.4, 5.2], [10.3, 40.4], [90.4, 40.4], [89.6, 4.9]])], [0.5]),
        "img_3.jpg": ([], []),
    }
    hexagon = np.array([[0, 10], [20, 0], [60, 0], [80, 10], [60, 20], [20, 20]], np.float32) + 100
    results["img_9"] = ([hexagon.reshape(-1)], [0.7])  # flat (2K,) input with K != 4
    paths = write_submission(str(tmp_path), results)
    assert sorted(os.path.basename(p) for p in paths) == ["res_img_1.txt", "res_img_3.txt", "res_img_7.txt",
                                                         "res_img_9.txt"]

    quads = parse(tmp_path / "res_img_1.txt")
    assert len(quads) == 2
    expected = np.rint(rotated).astype(int)
    for quad in quads:
        assert clockwise_on_screen(quad)
        assert same_cycle(quad, expected) or same_cycle(quad, expected[::-1])
        assert np.argmin(quad.sum(axis=1)) == 0  # starts at the top-left-most corner
    assert np.array_equal(quads[0], quads[1])

    (quad,) = parse(tmp_path / "res_img_7.txt")
    assert np.array_equal(quad, [[10, 5], [90, 5], [90, 40], [10, 40]])

    assert parse(tmp_path / "res_img_3.txt") == []

    (quad,) = parse(tmp_path / "res_img_9.txt")
    box = np.rint(cv2.boxPoints(cv2.minAreaRect(hexagon))).astype(int)
    assert clockwise_on_screen(quad) and (same_cycle(quad, box) or same_cycle(quad, box[::-1]))


def test_random_quads_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    polygons = []
    for _ in range(50):
        quad = cv2.boxPoints(((rng.uniform(50, 1200), rng.uniform(50, 650)), (rng.uniform(10, 200),
                              rng.uniform(10, 60)), rng.uniform(-90, 90)))
        polygons.append(quad[rng.permutation(4)] if rng.random() < 0.3 else quad)  # some in crossed order
    write_submission(str(tmp_path), {"img_5.jpg": (polygons, [0.9] * 50)})
    quads = parse(tmp_path / "res_img_5.txt")
    assert len(quads) == 50
    for quad, polygon in zip(quads, polygons):
        assert clockwise_on_screen(quad)
        assert sorted(map(tuple, quad.tolist())) == sorted(map(tuple, np.rint(polygon).astype(int).tolist()))


def test_zip_and_scores(tmp_path):
    results = {"img_2.jpg": ([np.array([[0, 0], [10, 0], [10, 10], [0, 10]])], [0.25])}
    paths = write_submission(str(tmp_path), results, with_scores=True, zip_name="submit.zip")
    assert os.path.basename(paths[-1]) == "submit.zip"
    with zipfile.ZipFile(paths[-1]) as zf:
        assert zf.namelist() == ["res_img_2.txt"]
        assert zf.read("res_img_2.txt").decode() == "0,0,10,0,10,10,0,10,0.250000\n"


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="img_4.jpg"):
        write_submission(str(tmp_path), {"img_4.jpg": ([np.zeros((2, 2))], [0.9])})
    with pytest.raises(ValueError, match="same result file"):
        write_submission(str(tmp_path), {"a/img_1.jpg": ([], []), "b/img_1.jpg": ([], [])})
    with pytest.raises(ValueError, match="non-finite"):
        to_clockwise_quad(np.array([[0, 0], [1, np.nan], [1, 1], [0, 1]]))


def test_scored_lines_round_trip_exactly_and_reproduce_the_hmean(tmp_path):
    """Scored result files read back to the same float32 polygons and scores, so the metric's
    threshold sweep (which needs the scores) gives the same P / R / H as the in-memory run."""
    from dbnetpp.cli import parse_result_file, write_result_file
    from dbnetpp.metric import HmeanIoU
    from dbnetpp.submission import format_scored_line

    rng = np.random.default_rng(0)
    gts, preds = [], []
    for _ in range(6):
        boxes = [cv2.boxPoints(((rng.uniform(50, 500), rng.uniform(50, 500)), (60, 20), rng.uniform(-30, 30)))
                 for _ in range(4)]
        jitter = [b + rng.normal(0, 6, b.shape).astype(np.float32) for b in boxes]
        scores = rng.uniform(0.5, 0.95, len(jitter)).tolist()
        # false positives scored 0.3 ... 0.45: the best threshold of the 0.3 ... 0.9 sweep is above them
        jitter += [b + np.float32(700) for b in boxes[:2]]
        scores += rng.uniform(0.3, 0.45, 2).tolist()
        gts.append(boxes)
        preds.append([(p.astype(np.float32), s) for p, s in zip(jitter, scores)])

    def score(per_image):
        metric = HmeanIoU()
        for gt, dets in zip(gts, per_image):
            metric.update([p for p, _ in dets], [s for _, s in dets], gt, [False] * len(gt))
        return metric.compute()

    read_back = []
    for i, dets in enumerate(preds):
        write_result_file(tmp_path / f"res_{i}.txt", dets, with_scores=True)
        polygons, scores = parse_result_file(tmp_path / f"res_{i}.txt")
        for (p, s), q, t in zip(dets, polygons, scores):
            assert t == s
            assert same_cycle(q, p) or same_cycle(q, p[::-1])  # exact values, maybe reversed
        read_back.append(list(zip(polygons, scores)))
    want, got = score(preds), score(read_back)
    assert want["score_thr"] > 0.35  # the sweep matters here: scores of 1.0 would change the result
    assert (got["precision"], got["recall"], got["hmean"], got["score_thr"]) == (
        want["precision"], want["recall"], want["hmean"], want["score_thr"])
    unscored = [[(p, 1.0) for p, _ in dets] for dets in preds]
    assert score(unscored)["hmean"] != want["hmean"]
    line = format_scored_line(np.array([[0, 0], [0, 10], [10, 10], [10, 0]], np.float32), 0.5)
    assert line == "10.0,0.0,10.0,10.0,0.0,10.0,0.0,0.0,0.5"  # reversed: clockwise on screen
    with pytest.raises(ValueError, match="finite"):
        format_scored_line(np.zeros((4, 2)), float("nan"))

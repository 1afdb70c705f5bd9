import itertools
import json
import pickle

import cv2
import numpy as np
import pytest
from shapely.geometry import Polygon

from dbnetpp.metric import DEFAULT_SCORE_THRS, HmeanIoU, iou_matrix, max_match_count, vanilla_match_count


def box(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)


# ---------------------------------------------------------------- brute force
def _valid(p):
    q = p if p.is_valid else p.buffer(0)
    return q if isinstance(q, Polygon) else q.convex_hull


def brute_force(images, thrs=DEFAULT_SCORE_THRS, iou_thr=0.5, ignore_thr=0.5):
    """Plain loops over every pair with shapely; returns P/R/H per threshold."""
    thrs = [float(t) for t in thrs]
    hits, preds, gts = [0] * len(thrs), [0] * len(thrs), 0
    for pred_polys, scores, gt_polys, ignore in images:
        P = [Polygon(np.asarray(p, np.float32).reshape(-1, 2)) for p in pred_polys]
        G = [Polygon(np.asarray(g, np.float32).reshape(-1, 2)) for g in gt_polys]
        s = [float(np.float32(v)) for v in scores]  # float32 scores, compared in double
        kept = []
        for j, p in enumerate(P):
            if s[j] < min(thrs):
                continue
            inside_ignored = any(
                ignore[i] and _valid(g).intersection(_valid(p)).area / (p.area + 1e-5) > ignore_thr
                for i, g in enumerate(G)
            )
            if not inside_ignored:
                kept.append(j)
        care = [i for i in range(len(G)) if not ignore[i]]
        gts += len(care)
        for t, thr in enumerate(thrs):
            selected = [j for j in kept if not s[j] < thr]
            preds[t] += len(selected)
            used_g, used_p = set(), set()
            for i in care:
                for j in selected:
                    a, b = _valid(G[i]), _valid(P[j])
                    union = a.union(b).area
                    overlap = a.intersection(b).area / union if union != 0 else 0.0
                    if overlap > iou_thr and i not in used_g and j not in used_p:
                        used_g.add(i)
                        used_p.add(j)
            hits[t] += len(used_g)
    out = []
    for t in range(len(thrs)):
        recall = hits[t] / gts if gts else 1.0
        precision = hits[t] / preds[t] if preds[t] else (0.0 if gts else 1.0)
        if gts == 0:
            precision = 0.0 if preds[t] else 1.0
        hmean = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append((precision, recall, hmean))
    return out


def random_image(rng, size=(720, 1280)):
    h, w = size
    gts, ignore = [], []
    for _ in range(rng.integers(0, 8)):
        c = (rng.uniform(0, w), rng.uniform(0, h))
        gts.append(cv2.boxPoints((c, (rng.uniform(10, 200), rng.uniform(8, 50)), rng.uniform(-45, 45))))
        ignore.append(bool(rng.random() < 0.35))
    preds, scores = [], []
    for g in gts:  # detections near the ground truth, some far off, some twice
        for _ in range(rng.integers(0, 3)):
            preds.append(g + rng.normal(0, rng.choice([1.0, 5.0, 15.0]), g.shape).astype(np.float32))
            scores.append(rng.uniform(0.2, 1.0))
    for _ in range(rng.integers(0, 4)):  # random polygons: often self-crossing
        n = int(rng.integers(3, 9))
        preds.append(rng.uniform([0, 0], [w, h], size=(n, 2)).astype(np.float32) * 0.2 + rng.uniform(0, 600))
        scores.append(rng.uniform(0.2, 1.0))
    if preds and rng.random() < 0.5:  # a bow-tie: two corners swapped
        p = preds[int(rng.integers(len(preds)))].copy()
        if len(p) >= 4:
            p[[1, 2]] = p[[2, 1]]
            preds.append(p)
            scores.append(rng.uniform(0.3, 1.0))
    if rng.random() < 0.3:  # degenerate: all points on a line
        preds.append(np.array([[10, 10], [50, 50], [90, 90], [30, 30]], np.float32))
        scores.append(0.9)
    scores = [float(np.float32(rng.choice([s, 0.3, 0.7, 0.5]))) for s in scores]  # hit the thresholds exactly
    return preds, scores, gts, ignore


def run_metric(images, **kwargs):
    metric = HmeanIoU(**kwargs)
    for image in images:
        metric.update(*image)
    return metric


# ---------------------------------------------------------------- tests
def test_default_thresholds_are_numpy_arange():
    assert DEFAULT_SCORE_THRS == tuple(np.arange(0.3, 0.9, 0.1).tolist())
    assert len(DEFAULT_SCORE_THRS) == 7
    assert DEFAULT_SCORE_THRS[0] == 0.3 and DEFAULT_SCORE_THRS[-1] == 0.9000000000000001


@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_brute_force_on_random_polygons(seed):
    rng = np.random.default_rng(seed)
    images = [random_image(rng) for _ in range(12)]
    metric = run_metric(images)
    want = brute_force(images)
    got = [(r["precision"], r["recall"], r["hmean"]) for r in metric.compute_all()]
    assert got == want
    best = max(range(len(want)), key=lambda t: (want[t][2], -t))
    assert metric.compute() == {
        "precision": want[best][0], "recall": want[best][1], "hmean": want[best][2],
        "score_thr": DEFAULT_SCORE_THRS[best],
    }


def test_iou_matrix_is_bit_identical_to_pairwise_shapely():
    rng = np.random.default_rng(11)
    preds, _, gts, _ = random_image(rng)
    while len(gts) < 3 or len(preds) < 3:
        preds, _, gts, _ = random_image(rng)
    G = [_valid(Polygon(g)) for g in gts]
    P = [_valid(Polygon(p)) for p in preds]
    got = iou_matrix(G, P)
    for i, g in enumerate(G):
        for j, p in enumerate(P):
            union = g.union(p).area
            assert got[i, j] == (g.intersection(p).area / union if union != 0 else 0.0)
    assert (got > 0).any()


def test_split_box_gives_no_hit():
    metric = HmeanIoU()
    metric.update([box(0, 0, 50, 20), box(50, 0, 100, 20)], [0.9, 0.9], [box(0, 0, 100, 20)], [False])
    # each half has IoU 0.5, and matching needs IoU > 0.5
    assert metric.compute() == {"precision": 0.0, "recall": 0.0, "hmean": 0.0, "score_thr": DEFAULT_SCORE_THRS[0]}


def test_two_gts_merged_into_one_prediction():
    metric = HmeanIoU()
    metric.update([box(0, 0, 100, 20)], [0.9], [box(0, 0, 60, 20), box(60, 0, 100, 20)], [False, False])
    result = metric.compute()
    assert (result["precision"], result["recall"]) == (1.0, 0.5)
    assert result["hmean"] == pytest.approx(2 / 3)


def test_prediction_on_ignored_region_is_not_counted():
    gts = [box(0, 0, 100, 20), box(200, 0, 300, 20)]
    ignore = [False, True]
    metric = HmeanIoU()
    metric.update([box(2, 0, 100, 20), box(195, 0, 290, 22)], [0.9, 0.9], gts, ignore)
    assert metric.compute()["precision"] == 1.0 and metric.compute()["recall"] == 1.0
    # 40 % inside the ignored box is not enough: a false positive
    metric = HmeanIoU()
    metric.update([box(2, 0, 100, 20), box(260, 0, 360, 20)], [0.9, 0.9], gts, ignore)
    assert metric.compute()["precision"] == 0.5
    assert metric.gt_num == 1


def test_score_sweep_picks_best_threshold():
    gts = [box(0, 0, 100, 20), box(0, 100, 100, 120)]
    preds = gts + [box(300, 300 + 40 * i, 400, 320 + 40 * i) for i in range(3)]
    scores = [0.75, 0.75, 0.35, 0.35, 0.35]
    metric = HmeanIoU()
    metric.update(preds, scores, gts, [False, False])
    table = metric.compute_all()
    assert table[0]["precision"] == 2 / 5 and table[0]["recall"] == 1.0
    assert table[1]["hmean"] == 1.0 and table[5]["hmean"] == 0.0  # thr 0.8 drops the 0.75s
    assert metric.compute() == {"precision": 1.0, "recall": 1.0, "hmean": 1.0, "score_thr": DEFAULT_SCORE_THRS[1]}


def test_float32_score_against_float64_threshold():
    # float32(0.7) = 0.699999988 < 0.7000000000000002: not kept at threshold "0.7"
    metric = HmeanIoU()
    metric.update([box(0, 0, 10, 10)], [0.7], [box(0, 0, 10, 10)], [False])
    recalls = [r["recall"] for r in metric.compute_all()]
    assert recalls == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_edge_cases_without_gt_or_predictions():
    metric = HmeanIoU()
    metric.update([], [], [], [])
    assert metric.compute() == {"precision": 1.0, "recall": 1.0, "hmean": 1.0, "score_thr": DEFAULT_SCORE_THRS[0]}
    metric.update([box(0, 0, 10, 10)], [0.95], [], [])
    assert metric.compute()["precision"] == 0.0 and metric.compute()["recall"] == 1.0
    # a 0.9 score is below the last threshold 0.9000000000000001: nothing left there, P = R = 1
    metric = HmeanIoU()
    metric.update([box(0, 0, 10, 10)], [0.9], [], [])
    assert metric.compute() == {"precision": 1.0, "recall": 1.0, "hmean": 1.0, "score_thr": DEFAULT_SCORE_THRS[-1]}
    metric = HmeanIoU()
    metric.update([], [], [box(0, 0, 10, 10)], [False])
    assert metric.compute() == {"precision": 0.0, "recall": 0.0, "hmean": 0.0, "score_thr": DEFAULT_SCORE_THRS[0]}


def test_vanilla_is_greedy_and_max_matching_is_optimal():
    gts = [box(0, 0, 80, 20), box(30, 0, 100, 20)]
    preds = [box(0, 0, 100, 20), box(0, 0, 70, 20)]
    # IoU: gt0-p0 0.8, gt0-p1 0.875, gt1-p0 0.7, gt1-p1 0.4
    vanilla = run_metric([(preds, [0.9, 0.9], gts, [False, False])])
    assert vanilla.compute()["recall"] == 0.5  # gt0 takes p0 first, gt1 is left alone
    best = run_metric([(preds, [0.9, 0.9], gts, [False, False])], strategy="max_matching")
    assert best.compute()["recall"] == 1.0


def test_invalid_polygons_never_crash():
    weird = [
        np.array([[0, 0], [10, 10], [10, 0], [0, 10]], np.float32),  # bow-tie
        np.array([[0, 0], [10, 10], [20, 20]], np.float32),  # collinear
        np.array([[5, 5], [5, 5], [5, 5], [5, 5]], np.float32),  # a point
        np.array([[0, 0], [20, 0], [20, 20], [0, 20], [0, 0], [10, 10]], np.float32),  # spike
        np.array([[0, 0], [10, 0], [10, 10], [0, 10], [0, 0], [30, 30], [40, 30], [40, 40], [30, 40]], np.float32),
    ]
    metric = HmeanIoU()
    metric.update(weird, [0.9] * len(weird), weird, [False, True, False, True, False])
    metric.update(weird, [0.9] * len(weird), [box(0, 0, 10, 10)], [False])
    result = metric.compute()
    assert all(np.isfinite(v) for v in result.values())
    want = brute_force([(weird, [0.9] * 5, weird, [False, True, False, True, False]),
                        (weird, [0.9] * 5, [box(0, 0, 10, 10)], [False])])
    assert [(r["precision"], r["recall"], r["hmean"]) for r in metric.compute_all()] == want


def test_repair_into_pieces_uses_their_convex_hull():
    # two boxes joined by a doubled edge: buffer(0) gives two pieces (2600 px^2),
    # whose convex hull (4600 px^2) covers 4600 / 6000 of the ground truth
    pred = np.array([[0, 0], [100, 0], [100, 20], [0, 20], [0, 0], [60, 40], [90, 40], [90, 60], [60, 60],
                     [60, 40]], np.float32)
    metric = HmeanIoU()
    metric.update([pred], [0.9], [box(0, 0, 100, 60)], [False])
    assert metric.compute()["recall"] == 1.0  # the pieces alone would give IoU 0.43


def test_bad_input_is_reported():
    metric = HmeanIoU()
    with pytest.raises(ValueError, match="scores"):
        metric.update([box(0, 0, 1, 1)], [], [], [])
    with pytest.raises(ValueError, match="ignore"):
        metric.update([], [], [box(0, 0, 1, 1)], [])
    with pytest.raises(ValueError, match=r"pred_polygons\[0\]"):
        metric.update([np.zeros((2, 2))], [0.9], [], [])
    with pytest.raises(ValueError, match="strategy"):
        HmeanIoU(strategy="hungarian")


def test_state_merge_equals_single_pass():
    rng = np.random.default_rng(7)
    images = [random_image(rng) for _ in range(10)]
    whole = run_metric(images)
    parts = [run_metric(images[:3]), run_metric(images[3:])]
    merged = HmeanIoU()
    for part in parts:
        state = pickle.loads(pickle.dumps(json.loads(json.dumps(part.state()))))
        merged.merge(state)
    assert merged.compute_all() == whole.compute_all()
    assert merged.num_images == 10
    with pytest.raises(ValueError, match="thresholds"):
        HmeanIoU(score_thrs=[0.5]).merge(whole.state())
    merged.reset()
    assert merged.num_images == 0 and merged.gt_num == 0


def load_test_ground_truth(root):
    from dbnetpp.data.icdar2015 import ICDAR2015

    data = ICDAR2015(root, "test", require_images=False)
    return [(ann["polygons"], ann["ignore"]) for ann in data.annotations]


def test_real_ground_truth_against_itself(icdar_root):
    images = load_test_ground_truth(icdar_root)
    assert len(images) > 0
    metric = HmeanIoU()
    for polygons, ignore in images:
        # every GT polygon, '###' ones too, as a prediction with score 1
        metric.update(polygons, [1.0] * len(polygons), polygons, ignore)
    assert metric.compute() == {"precision": 1.0, "recall": 1.0, "hmean": 1.0, "score_thr": DEFAULT_SCORE_THRS[0]}
    assert metric.gt_num == sum(int((~np.asarray(ig, bool)).sum()) for _, ig in images)


def brute_force_max_matching(matched):
    """Largest k such that some k gts take k distinct predictions they match (exhaustive)."""
    g, p = matched.shape
    best = 0
    for k in range(1, min(g, p) + 1):
        if any(all(matched[a, b] for a, b in zip(gts, preds))
               for gts in itertools.combinations(range(g), k) for preds in itertools.permutations(range(p), k)):
            best = k
    return best


def test_max_match_count_is_a_maximum_matching_without_scipy():
    rng = np.random.default_rng(0)
    cases = [np.zeros((0, 3), bool), np.zeros((2, 0), bool), np.ones((3, 3), bool), np.eye(4, dtype=bool)[::-1]]
    cases += [rng.random((rng.integers(1, 6), rng.integers(1, 6))) < rng.uniform(0.2, 0.7) for _ in range(150)]
    # greedy takes (0, 0) and blocks gt 1; the maximum reassigns gt 0 to prediction 1
    cases.append(np.array([[True, True], [True, False]]))
    for matched in cases:
        want = brute_force_max_matching(matched)
        assert max_match_count(matched) == want, matched.astype(int).tolist()
        assert vanilla_match_count(matched) <= want
    assert vanilla_match_count(cases[-1]) == 1 and max_match_count(cases[-1]) == 2

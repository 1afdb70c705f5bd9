"""Property-based tests (hypothesis) at every boundary that takes outside data.

Properties, not examples: the only exception is the documented ``ValueError`` naming the input;
outputs are finite and in range; orientation and order invariance where they hold; a saved then
loaded value is the one saved. The example count comes from the profile in ``conftest.py``
(default: small and derandomized; ``HYPOTHESIS_PROFILE=long`` for a deep search).
"""

import io
import json
import math
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from dbnetpp.checkpoint import CheckpointError, read_checkpoint, save_checkpoint  # noqa: E402
from dbnetpp.cli import parse_result_file, write_result_file  # noqa: E402
from dbnetpp.data import read_image  # noqa: E402
from dbnetpp.data.icdar2015 import parse_gt_file  # noqa: E402
from dbnetpp.data.targets import db_targets  # noqa: E402
from dbnetpp.data.textdet_json import load_textdet_json  # noqa: E402
from dbnetpp.metric import HmeanIoU  # noqa: E402
from dbnetpp.postprocess import DBPostProcessor  # noqa: E402

FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
SPECIAL = st.sampled_from([0.0, 1.0, 0.3, 0.5, np.nan, np.inf, -np.inf, -1.0, 2.0, 1e30])


def scratch(tmp_path_factory, name: str) -> Path:
    """A fresh file path per example (hypothesis reuses the test's tmp_path)."""
    return tmp_path_factory.mktemp("prop") / name


# ----------------------------------------------------------------------------- post-processing


@st.composite
def prob_maps(draw):
    """Small maps: blocks of text-like values, noise, and a sprinkle of non-finite values."""
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    kind = draw(st.sampled_from(["blocks", "noise", "any"]))
    if kind == "any":
        return draw(hnp.arrays(np.float32, (h, w), elements=FLOATS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    prob = rng.random((h, w), dtype=np.float32) if kind == "noise" else np.zeros((h, w), np.float32)
    for _ in range(draw(st.integers(0, 4))):
        y, x = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        prob[y : y + draw(st.integers(1, h)), x : x + draw(st.integers(1, w))] = draw(st.floats(0, 1, width=32))
    for _ in range(draw(st.integers(0, 3))):
        prob[draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = draw(SPECIAL)
    return prob


postprocessors = st.builds(
    DBPostProcessor,
    text_repr_type=st.sampled_from(["quad", "poly"]),
    mask_thr=st.floats(0, 1),
    min_text_score=st.floats(0, 1),
    min_text_width=st.floats(0, 8),
    unclip_ratio=st.floats(0, 4),
    epsilon_ratio=st.floats(0, 0.2),
    max_candidates=st.integers(0, 50),
)


@given(prob=prob_maps(), pp=postprocessors, scale=st.tuples(st.floats(0.05, 20), st.floats(0.05, 20)))
def test_postprocess_outputs_are_finite_and_in_range(prob, pp, scale):
    polygons, scores = pp(prob, scale)
    assert len(polygons) == len(scores) <= pp.max_candidates + 1
    finite_in_unit = np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1
    for polygon, score in zip(polygons, scores):
        assert polygon.dtype == np.float32 and polygon.ndim == 2 and polygon.shape[1] == 2
        assert polygon.shape[0] == 4 if pp.text_repr_type == "quad" else polygon.shape[0] >= 4
        assert np.isfinite(polygon).all() and math.isfinite(score)
        assert score >= pp.min_text_score
        if finite_in_unit:
            assert score <= 1
    # the same map as a tensor gives the same result
    t_polygons, t_scores = pp(torch.from_numpy(prob), scale)
    assert t_scores == scores and all(np.array_equal(a, b) for a, b in zip(polygons, t_polygons))


SETTINGS = dict(
    mask_thr=FLOATS, min_text_score=FLOATS, min_text_width=FLOATS, unclip_ratio=FLOATS, epsilon_ratio=FLOATS,
    max_candidates=st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True), st.booleans()),
    text_repr_type=st.sampled_from(["quad", "poly", "QUAD", "", "polygon"]),
)  # fmt: skip


@given(st.fixed_dictionaries({}, optional=SETTINGS))
def test_postprocessor_settings_are_accepted_exactly_when_valid(kwargs):
    def ok(name, low=-math.inf, high=math.inf):
        v = kwargs.get(name, 0.5)
        return math.isfinite(v) and low <= v <= high

    valid = (
        kwargs.get("text_repr_type", "quad") in ("quad", "poly")
        and ok("mask_thr") and ok("min_text_score") and ok("min_text_width", 0) and ok("unclip_ratio", 0, 100)
        and ok("epsilon_ratio", 0, 1)
        and isinstance(kwargs.get("max_candidates", 1), int) and not isinstance(kwargs.get("max_candidates"), bool)
        and kwargs.get("max_candidates", 1) >= 0
    )  # fmt: skip
    if valid:
        DBPostProcessor(**kwargs)
    else:
        with pytest.raises(ValueError):
            DBPostProcessor(**kwargs)


# ----------------------------------------------------------------------------- target generation

COORD = st.floats(-80, 150, width=32)
POLYGON = st.lists(st.tuples(COORD, COORD), min_size=1, max_size=8).map(lambda p: np.array(p, np.float32))


def _non_finite(polygon: np.ndarray) -> np.ndarray:
    out = polygon.copy()
    out.flat[0] = np.nan
    out.flat[-1] = np.inf
    return out


@given(polygons=st.lists(st.one_of(POLYGON, POLYGON.map(_non_finite)), max_size=5),
       data=st.data(), h=st.integers(8, 48), w=st.integers(8, 48))  # fmt: skip
def test_targets_are_finite_and_in_range(polygons, data, h, w):
    ignore = data.draw(st.lists(st.booleans(), min_size=len(polygons), max_size=len(polygons)))
    with np.errstate(invalid="ignore"):
        targets = db_targets(polygons, ignore, h, w)
    for key, value in targets.items():
        assert value.shape == (h, w) and value.dtype == np.float32 and np.isfinite(value).all(), key
    for key in ("shrink_map", "shrink_mask", "thr_mask"):
        assert set(np.unique(targets[key])) <= {0.0, 1.0}, key
    assert targets["thr_map"].min() >= 0.3 - 1e-6 and targets["thr_map"].max() <= 0.7 + 1e-6


# ----------------------------------------------------------------------------- metric


@st.composite
def polygons_and_scores(draw, max_size=5):
    n = draw(st.integers(0, max_size))
    polygons = [draw(st.lists(st.tuples(COORD, COORD), min_size=3, max_size=6)) for _ in range(n)]
    scores = [draw(st.floats(0, 1)) for _ in range(n)]
    return [np.array(p, np.float32) for p in polygons], scores


@given(preds=polygons_and_scores(), gts=polygons_and_scores(), data=st.data(),
       strategy=st.sampled_from(["vanilla", "max_matching"]))  # fmt: skip
def test_metric_results_in_range_and_orientation_invariant(preds, gts, data, strategy):
    (pred_polys, scores), (gt_polys, _) = preds, gts
    ignore = data.draw(st.lists(st.booleans(), min_size=len(gt_polys), max_size=len(gt_polys)))
    results = []
    for flip in (False, True):
        metric = HmeanIoU(strategy=strategy)
        flipped = (lambda p: p[::-1]) if flip else (lambda p: p)
        metric.update([flipped(p) for p in pred_polys], scores, [flipped(g) for g in gt_polys], ignore)
        results.append(metric.compute_all())
    assert results[0] == results[1]
    for r in results[0]:
        assert all(0 <= r[k] <= 1 and math.isfinite(r[k]) for k in ("precision", "recall", "hmean"))


@given(preds=polygons_and_scores(), gts=polygons_and_scores(), seed=st.integers(0, 100))
def test_max_matching_is_order_invariant_and_perfect_predictions_score_1(preds, gts, seed):
    (pred_polys, scores), (gt_polys, _) = preds, gts
    ignore = [False] * len(gt_polys)
    order = np.random.default_rng(seed).permutation(len(pred_polys))
    a, b = HmeanIoU(strategy="max_matching"), HmeanIoU(strategy="max_matching")
    a.update(pred_polys, scores, gt_polys, ignore)
    b.update([pred_polys[i] for i in order], [scores[i] for i in order], gt_polys, ignore)
    assert a.compute_all() == b.compute_all()
    # every ground-truth polygon with an area predicted exactly, score 1: all matched
    real = [g for g in gt_polys if cv2.contourArea(g) > 1 and len(g) == len(np.unique(g, axis=0))]
    assume(real)
    from shapely.geometry import Polygon

    assume(all(Polygon(g).is_valid for g in real))
    metric = HmeanIoU(strategy="max_matching")
    metric.update(real, [1.0] * len(real), real, [False] * len(real))
    assert metric.compute()["hmean"] == 1.0


@given(images=st.lists(st.tuples(polygons_and_scores(3), polygons_and_scores(3)), min_size=1, max_size=4),
       cut=st.integers(0, 4))  # fmt: skip
def test_metric_state_merges_across_processes(images, cut):
    whole, first, second = HmeanIoU(), HmeanIoU(), HmeanIoU()
    for k, ((pp, ps), (gp, _)) in enumerate(images):
        whole.update(pp, ps, gp, [False] * len(gp))
        (first if k < cut else second).update(pp, ps, gp, [False] * len(gp))
    first.merge(second.state())
    assert first.compute_all() == whole.compute_all() and first.num_images == whole.num_images


@given(preds=polygons_and_scores(3), bad=st.sampled_from([np.nan, np.inf, -np.inf, 1e39]),
       where=st.sampled_from(["score", "pred", "gt"]))  # fmt: skip
def test_metric_refuses_non_finite_input_with_a_value_error(preds, bad, where):
    pred_polys, scores = preds
    assume(pred_polys)
    gt = [pred_polys[0].copy()]
    if where == "score":
        scores = [bad] + scores[1:]
    elif where == "pred":
        pred_polys = [pred_polys[0] * np.float32(0) + np.float64(bad)] + pred_polys[1:]
    else:
        gt[0] = gt[0].astype(np.float64)
        gt[0][0, 0] = bad
    with pytest.raises(ValueError, match="finite"):
        HmeanIoU().update(pred_polys, scores, gt, [where == "gt"])


# ----------------------------------------------------------------------------- file readers

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x0b\x0c\x1c\x1d\x1e"
                                      "\x85\u2028\u2029"), max_size=12)  # fmt: skip


def expect_value_error_naming(path, call):
    try:
        return call()
    except ValueError as err:
        assert str(path) in str(err), err
        return None


@given(data=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_gt_reader_gives_a_result_or_an_error_naming_the_file(data, tmp_path_factory):
    path = scratch(tmp_path_factory, "gt_img_1.txt")
    path.write_bytes(data)
    out = expect_value_error_naming(path, lambda: parse_gt_file(path))
    if out is not None:
        assert len(out["polygons"]) == len(out["ignore"]) == len(out["texts"])
        assert all(p.shape == (4, 2) and np.isfinite(p).all() for p in out["polygons"])


@given(rows=st.lists(st.tuples(st.lists(st.integers(-10**6, 10**6), min_size=8, max_size=8), TEXT), max_size=5),
       bom=st.booleans(), crlf=st.booleans())  # fmt: skip
def test_gt_file_round_trip(rows, bom, crlf, tmp_path_factory):
    rows = [(coords, text) for coords, text in rows if text.strip() == text]  # the reader strips each line
    path = scratch(tmp_path_factory, "gt_img_1.txt")
    newline = "\r\n" if crlf else "\n"
    text = "".join(",".join(map(str, c)) + "," + t + newline for c, t in rows)
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    out = parse_gt_file(path)
    assert [p.reshape(-1).tolist() for p in out["polygons"]] == [[float(np.float32(v)) for v in c] for c, _ in rows]
    assert out["texts"] == [t for _, t in rows]
    assert out["ignore"].tolist() == [t == "###" for _, t in rows]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
        ["data_list", "img_path", "instances", "polygon", "ignore", "text", "x"]), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip


@given(value=JSON_VALUES | st.builds(lambda d: {"data_list": d}, JSON_VALUES), raw=st.binary(max_size=40))
def test_textdet_json_reader_gives_a_result_or_an_error_naming_the_file(value, raw, tmp_path_factory):
    path = scratch(tmp_path_factory, "textdet_test.json")
    for content in (json.dumps(value).encode(), raw):
        path.write_bytes(content)
        out = expect_value_error_naming(path, lambda: load_textdet_json(path, path.parent))
        if out is not None:
            images, annotations = out
            assert len(images) == len(annotations)
            assert all(np.isfinite(p).all() and p.shape[0] >= 3 for a in annotations for p in a["polygons"])


@given(detections=st.lists(st.tuples(st.lists(st.tuples(COORD, COORD), min_size=3, max_size=7),
                                     st.floats(0, 1)), max_size=4),
       fmt=st.sampled_from(["json", "scored"]))  # fmt: skip
def test_result_file_round_trip(detections, fmt, tmp_path_factory):
    detections = [(np.array(p, np.float32), s) for p, s in detections]
    path = scratch(tmp_path_factory, "res_img_1.json" if fmt == "json" else "res_img_1.txt")
    write_result_file(path, detections, "json" if fmt == "json" else "txt", with_scores=fmt == "scored")
    json.loads(path.read_text()) if fmt == "json" else None  # strict JSON parses
    polygons, scores = parse_result_file(path)
    assert len(polygons) == len(detections)
    for (want, want_score), got, score in zip(detections, polygons, scores):
        if fmt == "scored":  # exact values; points may be reversed to clockwise
            assert score == want_score
            assert np.array_equal(got, want) or np.array_equal(got, want[::-1])
        else:
            np.testing.assert_allclose(got, want, atol=0.006)
            assert score == pytest.approx(want_score, abs=1e-6)


@given(data=st.binary(max_size=120) | st.lists(st.lists(FLOATS.map(str) | st.text(max_size=3), max_size=10)
                                                .map(",".join), max_size=4).map(lambda r: "\n".join(r).encode()),
       suffix=st.sampled_from([".txt", ".json"]))  # fmt: skip
def test_result_reader_gives_finite_results_or_an_error_naming_the_file(data, suffix, tmp_path_factory):
    path = scratch(tmp_path_factory, "res_img_1" + suffix)
    path.write_bytes(data)
    out = expect_value_error_naming(path, lambda: parse_result_file(path))
    if out is not None:
        polygons, scores = out
        assert all(np.isfinite(p).all() and len(p) >= 3 for p in polygons) and np.isfinite(scores).all()


# ----------------------------------------------------------------------------- image decoding


def _encoded(ext: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    ok, data = cv2.imencode(ext, rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    assert ok
    return data.tobytes()


@given(ext=st.sampled_from([".png", ".jpg", ".bmp"]), seed=st.integers(0, 9), data=st.data())
def test_image_decoding_gives_an_image_or_an_error_naming_the_file(ext, seed, data, tmp_path_factory):
    raw = bytearray(_encoded(ext, seed))
    mutation = data.draw(st.sampled_from(["truncate", "flip", "garbage", "none"]))
    if mutation == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    elif mutation == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    elif mutation == "garbage":
        raw = bytearray(data.draw(st.binary(max_size=64)))
    path = scratch(tmp_path_factory, "img" + ext)
    path.write_bytes(bytes(raw))
    image = expect_value_error_naming(path, lambda: read_image(path))
    if mutation == "none":
        assert image is not None and image.shape == (12, 16, 3)
    if image is not None:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.size > 0


@pytest.fixture(scope="module")
def small_detector():
    from dbnetpp.detector import Detector
    from dbnetpp.models.dbnet import build_model

    torch.manual_seed(0)
    return Detector(build_model("dbnet_resnet18_tiny"), test_scale=(96, 64), min_text_width=0, min_text_score=0.0,
                    prepare=False)


@given(h=st.integers(1, 400), w=st.integers(1, 400), channels=st.sampled_from([None, 3, 4]), seed=st.integers(0, 9))
def test_detector_takes_any_image_shape_and_returns_finite_polygons_inside_reach(small_detector, h, w, channels,
                                                                                 seed):
    shape = (h, w) if channels is None else (h, w, channels)
    image = np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)
    for polygon, score in small_detector.detect(image):
        assert polygon.dtype == np.float32 and np.isfinite(polygon).all() and 0 <= score <= 1
        # unclipped boxes may reach past the image, never by more than its size
        margin = max(h, w)
        assert polygon.min() >= -margin and polygon[:, 0].max() <= w + margin and polygon[:, 1].max() <= h + margin


# ----------------------------------------------------------------------------- checkpoint loading

CKPT_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**62, 2**62) | st.floats(allow_nan=False) | st.text(max_size=6)
    | hnp.arrays(np.float32, st.integers(0, 4), elements=st.floats(-1e3, 1e3, width=32)).map(torch.from_numpy),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10,
)  # fmt: skip


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


@given(state=st.dictionaries(st.text(max_size=6), CKPT_VALUES, max_size=4))
def test_checkpoint_round_trip_is_the_identity(state, tmp_path_factory):
    path = scratch(tmp_path_factory, "last.pth")
    save_checkpoint(state, path)
    assert _same(read_checkpoint(path), state)


@given(data=st.data())
def test_damaged_checkpoints_give_a_checkpoint_error_naming_the_file(data, tmp_path_factory):
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.arange(6.0)}, "model_name": "m", "epoch": 1}, buffer)
    raw = bytearray(buffer.getvalue())
    mutation = data.draw(st.sampled_from(["truncate", "flip", "garbage", "zip"]))
    if mutation == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif mutation == "flip":
        for _ in range(data.draw(st.integers(1, 6))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    elif mutation == "garbage":
        raw = bytearray(data.draw(st.binary(max_size=64)))
    else:  # a zip that is not a torch file
        zbuf = io.BytesIO()
        with zipfile.ZipFile(zbuf, "w") as z:
            z.writestr(data.draw(st.sampled_from(["data.pkl", "a/data.pkl", "x"])), data.draw(st.binary(max_size=40)))
        raw = bytearray(zbuf.getvalue())
    path = scratch(tmp_path_factory, "last.pth")
    path.write_bytes(bytes(raw))
    try:
        out = read_checkpoint(path)
    except CheckpointError as err:
        assert str(path) in str(err)
    else:
        assert isinstance(out, dict)


# ----------------------------------------------------------------------------- training script arguments


@pytest.fixture(scope="module")
def train_module():
    from helpers import load_train_script

    return load_train_script("dbnetpp_train_script_properties")


NUMBER_TEXT = st.one_of(st.integers(-3, 10**5).map(str), FLOATS.map(repr), st.sampled_from(["nan", "inf", "-0", "1e9"]))
INT_FLAGS = ["--epochs", "--max-iters", "--batch-size", "--workers", "--train-size", "--eval-interval",
             "--save-interval", "--save-interval-iters", "--keep-last", "--log-interval", "--seed"]  # fmt: skip
FLOAT_FLAGS = ["--lr", "--momentum", "--weight-decay", "--clip-grad", "--dist-timeout"]


@given(flags=st.dictionaries(st.sampled_from(INT_FLAGS + FLOAT_FLAGS + ["--test-scale", "--synthetic-images"]),
                             st.lists(NUMBER_TEXT, min_size=2, max_size=2), max_size=4))  # fmt: skip
def test_train_arguments_give_a_config_or_a_value_error(flags, train_module):
    argv = ["--preset", "tiny"]
    for flag, values in flags.items():
        argv += [flag, *values] if flag in ("--test-scale", "--synthetic-images") else [flag, values[0]]
    try:
        args = train_module.get_args_parser().parse_args(argv)
    except SystemExit as exit:  # argparse's own one-line usage error (not a number, wrong type)
        assert exit.code == 2
        return
    try:
        train_module.check_args(args)
        cfg = train_module.config_from_args(args)
    except ValueError:
        return
    for value in (cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay, cfg.model.epsilon_ratio):
        assert math.isfinite(value)
    assert cfg.train.batch_size >= 1 and cfg.data.train_size % 32 == 0 and min(cfg.data.test_scale) >= 32

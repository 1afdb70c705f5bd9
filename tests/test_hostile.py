"""Hostile input, one test per defect of issue 19: each fails on the code before the fix.

Through ``dbnetpp detect`` / ``eval`` (in this process, ``dbnetpp.cli.main``), ``examples/train.py``
(``run``) and the library: every case ends in a result or one ``error: ...`` line naming the input,
never a traceback, a non-finite number in an output file, or a lost or overwritten file.
"""

import json
import os
import stat
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import load_train_script

from dbnetpp.checkpoint import read_checkpoint, save_checkpoint
from dbnetpp.cli import error_line, main, parse_result_file, write_result_file
from dbnetpp.data import read_image
from dbnetpp.data.icdar2015 import parse_gt_file
from dbnetpp.data.textdet_json import load_textdet_json
from dbnetpp.metric import HmeanIoU
from dbnetpp.models.dbnet import build_model
from dbnetpp.postprocess import MAX_CONTOURS, DBPostProcessor, contour_bound

GT_LINE = "8,8,56,8,56,24,8,24,word\n"
QUAD = np.array([[8, 8], [56, 8], [56, 24], [8, 24]], np.float32)


def write_image(path: Path, seed: int = 0, size: int = 64) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    return path


def icdar_folder(root: Path, split: str = "test", images: int = 2, broken=()) -> Path:
    """ICDAR 2015 official layout with ``images`` 64x64 images img_1..img_N (those in ``broken``
    are 0-byte files) and one ground-truth quad each."""
    image_dir, gt_dir = {"test": ("ch4_test_images", "Challenge4_Test_Task1_GT"),
                         "train": ("ch4_training_images", "ch4_training_localization_transcription_gt")}[split]
    for i in range(1, images + 1):
        path = root / image_dir / f"img_{i}.jpg"
        if i in broken:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        else:
            write_image(path, seed=i)
        (root / gt_dir).mkdir(parents=True, exist_ok=True)
        (root / gt_dir / f"gt_img_{i}.txt").write_text(GT_LINE)
    return root


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """Untrained small DBNet in the dbnetpp checkpoint format (these tests need no trained model)."""
    torch.manual_seed(0)
    model = build_model("dbnet_resnet18_tiny")
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save({"model": model.state_dict(), "model_name": model.name, "epoch": 0}, path)
    return path


def cli(capsys, *argv):
    status = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return status, out.out, [line for line in out.err.splitlines() if line.startswith("error: ")]


# ----------------------------------------------------------------------------- 1. detect: unique outputs


def test_detect_refuses_inputs_whose_outputs_would_collide(tmp_path, tiny_weights, capsys):
    a, b = write_image(tmp_path / "a" / "img_1.jpg"), write_image(tmp_path / "b" / "img_1.jpg", seed=1)
    c = write_image(tmp_path / "a" / "img_1.png", seed=2)
    out = tmp_path / "out"
    status, _, errors = cli(capsys, "detect", a, b, c, "--weights", tiny_weights, "--out", out,
                            "--test-scale", "64,64")
    assert status == 1 and len(errors) == 1
    assert str(a) in errors[0] and str(b) in errors[0] and "img_1" in errors[0]
    assert not out.exists()  # refused before any work
    # the same file named twice is one input: one result, nothing dropped
    status, stdout, errors = cli(capsys, "detect", a, a, "--weights", tiny_weights, "--out", out, "--no-vis",
                                 "--test-scale", "64,64")
    assert status == 0 and not errors and "in 1 image(s)" in stdout
    assert [p.name for p in out.iterdir()] == ["res_img_1.txt"]


# ----------------------------------------------------------------------------- 2. eval: output folders first


def test_eval_checks_output_folders_before_the_work_and_prints_the_result_before_drawing(tmp_path, capsys):
    data = icdar_folder(tmp_path / "data", images=2)
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / "res_img_1.txt").write_text("8,8,56,8,56,24,8,24\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for flag in ("--vis", "--save-predictions"):
        argv = ["eval", "--data", data, "--predictions", preds, flag, blocker / "vis"]
        if flag == "--save-predictions":
            argv = ["eval", "--data", data, "--weights", tmp_path / "never_read.pth", flag, blocker / "vis"]
        status, stdout, errors = cli(capsys, *argv)
        assert status == 1 and len(errors) == 1 and flag in errors[0] and str(blocker / "vis") in errors[0]
        assert stdout == ""  # nothing was computed, so nothing was lost

    # an image that cannot be drawn: the metric is printed first, the image listed, exit 1
    (data / "ch4_test_images" / "img_2.jpg").write_bytes(b"")
    status, stdout, errors = cli(capsys, "eval", "--data", data, "--predictions", preds, "--vis", tmp_path / "vis")
    record = json.loads(stdout.splitlines()[-1])
    assert status == 1 and record["hmean"] == pytest.approx(2 / 3) and record["num_images"] == 2
    assert any("img_2.jpg" in line for line in errors) and "skipped" in errors[-1]
    assert [p.name for p in (tmp_path / "vis").iterdir()] == ["vis_img_1.jpg"]


# ----------------------------------------------------------------------------- 3. + 7. broken images


def test_eval_scores_the_readable_images_lists_the_others_and_exits_1(tmp_path, tiny_weights, capsys):
    data = icdar_folder(tmp_path / "data", images=3, broken=(2,))
    (data / "ch4_test_images" / "img_3.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    status, stdout, errors = cli(capsys, "eval", "--data", data, "--weights", tiny_weights, "--test-scale", "64,64")
    first, record = stdout.splitlines()[0], json.loads(stdout.splitlines()[-1])
    assert status == 1
    assert "1 of 3 images scored" in first and record["num_images"] == 1
    assert [Path(p).name for p in record["skipped_images"]] == ["img_2.jpg", "img_3.jpg"]
    assert "img_2.jpg" in errors[-1] and "img_3.jpg" in errors[-1] and "2 of 3" in errors[-1]


def test_detect_skips_broken_images_with_the_same_policy(tmp_path, tiny_weights, capsys):
    good = write_image(tmp_path / "in" / "good.jpg")
    (tmp_path / "in" / "empty.jpg").write_bytes(b"")
    status, stdout, errors = cli(capsys, "detect", tmp_path / "in", "--weights", tiny_weights, "--out",
                                 tmp_path / "out", "--no-vis", "--test-scale", "64,64")
    assert status == 1 and "in 1 image(s)" in stdout
    assert "empty.jpg" in errors[-1] and "1 of 2" in errors[-1]
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f"res_{good.stem}.txt"]


@pytest.fixture(scope="module")
def train_module():
    return load_train_script("dbnetpp_train_script_hostile")


MICRO = [
    "--preset", "tiny_dbnet", "--train-size", "64", "--test-scale", "64", "64", "--batch-size", "1",
    "--epochs", "1", "--no-progress", "--threads", "1", "--no-pretrained", "--eval-interval", "0",
]  # fmt: skip


@pytest.mark.slow
def test_a_broken_training_image_is_the_same_one_line_error_with_any_number_of_workers(
    tmp_path, train_module, capsys, monkeypatch
):
    monkeypatch.delenv("DBNETPP_DEBUG", raising=False)
    data = icdar_folder(tmp_path / "data", "train", images=1, broken=(1,))
    icdar_folder(data, "test", images=1)
    lines = []
    for workers in ("0", "1"):
        status = train_module.run([*MICRO, "--data", str(data), "--workers", workers,
                                   "--work-dir", str(tmp_path / f"w{workers}")])
        err = capsys.readouterr().err
        assert status == 1 and "Traceback" not in err
        lines.append([line for line in err.splitlines() if line.strip()][-1])
    assert lines[0] == lines[1], lines
    assert lines[0].startswith("error: ") and "img_1.jpg" in lines[0] and "decode" in lines[0]


def test_error_line_unwraps_a_dataloader_worker_error():
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            raise ValueError("could not decode image: /data/img_7.jpg")

    with pytest.raises(ValueError) as caught:
        list(torch.utils.data.DataLoader(Broken(), num_workers=1))
    assert error_line(caught.value) == "could not decode image: /data/img_7.jpg"


# ----------------------------------------------------------------------------- 4. + 5. non-finite values


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_post_processing_output_is_finite_on_non_finite_maps(bad):
    prob = np.zeros((64, 96), np.float32)
    prob[10:30, 10:80] = 0.9
    prob[20, 40] = bad  # inside the text region
    prob[50, 5] = bad  # alone in the background
    # NaN and -inf read as 0, +inf as 1: the result is that of the finite map
    clean = np.nan_to_num(prob, nan=0.0, posinf=1.0, neginf=0.0)
    for text_repr in ("quad", "poly"):
        pp = DBPostProcessor(text_repr, min_text_width=1)
        want_polygons, want_scores = pp(clean, scale=(0.5, 0.5))
        assert want_polygons and all(0 <= s <= 1 for s in want_scores)
        for source in (prob, torch.from_numpy(prob), torch.from_numpy(prob).double()):
            polygons, scores = pp(source, scale=(0.5, 0.5))
            assert np.isfinite(scores).all() and all(np.isfinite(p).all() for p in polygons)
            assert scores == pytest.approx(want_scores)
            assert [p.tolist() for p in polygons] == [p.tolist() for p in want_polygons]


def test_metric_refuses_non_finite_scores_and_coordinates():
    metric = HmeanIoU()
    with pytest.raises(ValueError, match=r"pred_scores\[1\].*finite"):
        metric.update([QUAD, QUAD], [0.9, np.nan], [QUAD], [False])
    bad = QUAD.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"pred_polygons\[0\].*finite"):
        metric.update([bad], [0.9], [QUAD], [False])
    with pytest.raises(ValueError, match=r"gt_polygons\[1\].*finite"):  # ignored ground truth too
        metric.update([QUAD], [0.9], [QUAD, bad], [False, True])
    with pytest.raises(ValueError, match=r"gt_polygons\[0\].*finite"):  # 1e39 is inf in float32
        metric.update([QUAD], [0.9], [QUAD.astype(np.float64) * 1e39], [False])
    assert metric.num_images == 0 and metric.gt_num == 0  # nothing half-counted


def test_result_files_are_strict_and_finite(tmp_path, capsys):
    with pytest.raises(ValueError, match="res_a.json"):
        write_result_file(tmp_path / "res_a.json", [(QUAD, float("nan"))], fmt="json")
    with pytest.raises(ValueError, match="res_a.txt"):
        write_result_file(tmp_path / "res_a.txt", [(QUAD * np.inf, 0.9)], with_scores=True)
    write_result_file(tmp_path / "res_b.json", [(QUAD, 0.5)], fmt="json")
    json.loads((tmp_path / "res_b.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))

    data = icdar_folder(tmp_path / "data", images=1)
    preds = tmp_path / "preds"
    preds.mkdir()
    for line, what in [("nan,1,30,1,30,20,1,20,0.9", "res_img_1.txt:2"), ("1,1,30,1,30,20,1,20,nan", "score"),
                       ("1,1,30,1,30,20,1,20,inf,1", "res_img_1.txt:2"), ("1,1,3e39,1,30,20,1,20", "finite")]:
        (preds / "res_img_1.txt").write_text("8,8,56,8,56,24,8,24\n" + line + "\n")
        status, stdout, errors = cli(capsys, "eval", "--data", data, "--predictions", preds)
        assert status == 1 and len(errors) == 1 and "res_img_1.txt" in errors[0] and what in errors[0], errors
    (preds / "res_img_1.txt").unlink()
    (preds / "res_img_1.json").write_text('{"detections": [{"polygon": [[1, 1], [30, 1], [30, NaN]], "score": 1}]}')
    status, _, errors = cli(capsys, "eval", "--data", data, "--predictions", preds)
    assert status == 1 and "res_img_1.json" in errors[0] and "finite" in errors[0]


# ----------------------------------------------------------------------------- 6. not UTF-8


def test_files_that_are_not_utf8_name_the_file_and_line(tmp_path):
    gt = tmp_path / "gt_img_1.txt"
    gt.write_bytes(GT_LINE.encode() + b"1,1,2,1,2,2,1,2,caf\xe9\n")
    with pytest.raises(ValueError, match=r"gt_img_1.txt:2: not UTF-8"):
        parse_gt_file(gt)
    js = tmp_path / "textdet_test.json"
    js.write_bytes(b'{"data_list": [{"img_path": "\xff.jpg"}]}')
    with pytest.raises(ValueError, match=r"textdet_test.json:1: not UTF-8"):
        load_textdet_json(js, tmp_path)
    res = tmp_path / "res_img_1.txt"
    res.write_bytes(b"\x80\x81")
    with pytest.raises(ValueError, match=r"res_img_1.txt:1: not UTF-8"):
        parse_result_file(res)
    res_json = tmp_path / "res_img_1.json"
    res_json.write_bytes(b'{"detections": []}\n\xfe')
    with pytest.raises(ValueError, match=r"res_img_1.json:2: not UTF-8"):
        parse_result_file(res_json)


# ----------------------------------------------------------------------------- 8. bounded cost


def test_a_map_with_too_many_regions_gives_no_polygons_before_building_contours():
    side = int(np.ceil(np.sqrt(2 * MAX_CONTOURS))) + 2  # checkerboard: side^2 / 2 regions
    prob = ((np.indices((side, side)).sum(axis=0) % 2) * 0.9).astype(np.float32)
    assert contour_bound(prob > 0.3) > MAX_CONTOURS
    with pytest.warns(UserWarning, match="MAX_CONTOURS"):
        assert DBPostProcessor()(prob) == ([], [])


@pytest.mark.parametrize("seed", range(5))
def test_contour_bound_is_an_upper_bound(seed):
    rng = np.random.default_rng(seed)
    mask = (rng.random((40, 50)) < rng.uniform(0.2, 0.8)).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    assert len(contours) <= contour_bound(mask) <= contour_bound(mask, limit=10**9)  # tight, then runs bound


def test_a_huge_image_is_refused_from_its_header(tmp_path):
    from PIL import Image

    path = tmp_path / "huge.png"
    Image.new("1", (11_000, 10_000)).save(path)  # 110 megapixels in a few kB
    assert path.stat().st_size < 100_000
    with pytest.raises(ValueError, match=r"huge.png is 11000x10000 pixels.*MAX_IMAGE_PIXELS"):
        read_image(path)


# ----------------------------------------------------------------------------- 9. + 10. checkpoints


def test_resume_auto_refuses_an_unreadable_only_checkpoint_and_leaves_it(tmp_path, train_module, capsys):
    work = tmp_path / "w"
    work.mkdir()
    (work / "last.pth").write_bytes(b"PK\x03\x04 cut short by a disk error")
    status = train_module.run([*MICRO, "--synthetic-images", "2", "1", "--workers", "0", "--work-dir", str(work),
                               "--resume", "auto"])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and str(work / "last.pth") in err
    assert (work / "last.pth").read_bytes() == b"PK\x03\x04 cut short by a disk error"


def test_resume_of_another_architecture_names_the_file_and_the_stored_model(tmp_path, train_module, capsys):
    other = tmp_path / "other.pth"
    torch.save({"model": {}, "model_name": "dbnetpp_resnet50_dcnv2", "optimizer": {}, "epoch": 0}, other)
    status = train_module.run([*MICRO, "--synthetic-images", "2", "1", "--workers", "0",
                               "--work-dir", str(tmp_path / "w"), "--resume", str(other)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 1 and last.startswith("error: ")
    assert str(other) in last and "dbnetpp_resnet50_dcnv2" in last and "dbnet_resnet18_tiny" in last


def test_checkpoint_writes_remove_stale_partial_files_and_respect_the_umask(tmp_path):
    stale = [tmp_path / ".last.pth.k1ll3d.tmp", tmp_path / ".epoch_2.pth.abcdef12.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    other = tmp_path / ".notes.tmp"
    other.write_bytes(b"someone else's")
    old = os.umask(0o022)
    try:
        save_checkpoint({"epoch": 1}, [tmp_path / "last.pth", tmp_path / "epoch_2.pth"])
        os.umask(0o027)
        save_checkpoint({"epoch": 2}, tmp_path / "best.pth")
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "best.pth", "epoch_2.pth", "last.pth"]
    assert stat.S_IMODE((tmp_path / "last.pth").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "epoch_2.pth").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "best.pth").stat().st_mode) == 0o640
    assert read_checkpoint(tmp_path / "last.pth") == {"epoch": 1}


# ----------------------------------------------------------------------------- settings at construction


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(epsilon_ratio=float("nan")), "epsilon_ratio"),
        (dict(epsilon_ratio=2.0), "epsilon_ratio"),
        (dict(max_candidates=2.5), "max_candidates"),
        (dict(max_candidates=True), "max_candidates"),
        (dict(unclip_ratio=1e9), "unclip_ratio"),
        (dict(unclip_ratio=float("inf")), "unclip_ratio"),
        (dict(mask_thr=float("nan")), "mask_thr"),
        (dict(min_text_score="0.3"), "min_text_score"),
        (dict(min_text_width=-1), "min_text_width"),
    ],
)
def test_post_processor_and_detector_refuse_bad_settings_at_construction(kwargs, name, tiny_weights):
    from dbnetpp.detector import Detector

    with pytest.raises(ValueError, match=name):
        DBPostProcessor(**kwargs)
    with pytest.raises(ValueError, match=name):
        Detector(tiny_weights, **kwargs)


@pytest.mark.parametrize("scale", [(0, 10), (2.5, 10), (10**6, 10), (10,), ("a", "b"), (float("nan"), 1)])
def test_detector_refuses_a_bad_test_scale_before_reading_weights(scale, tmp_path):
    from dbnetpp.detector import Detector

    with pytest.raises(ValueError, match="test_scale"):
        Detector(tmp_path / "not_read.pth", test_scale=scale)


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("train", "lr", float("nan")),
        ("train", "epochs", 2.5),
        ("train", "momentum", float("inf")),
        ("train", "clip_grad", float("nan")),
        ("model", "epsilon_ratio", float("nan")),
        ("data", "train_size", 0),
        ("data", "test_scale", (10**6, 512)),
        ("data", "workers", 1.5),
    ],
)
def test_config_refuses_bad_values_where_it_is_made(section, key, value):
    import dataclasses

    from dbnetpp.config import Config, get_config

    with pytest.raises(ValueError, match=f"{section}.{key}|{key}"):
        get_config("tiny", **{section: {key: value}})
    base = Config()
    with pytest.raises(ValueError, match=key):
        dataclasses.replace(base, **{section: dataclasses.replace(getattr(base, section), **{key: value})})


def test_warnings_are_not_raised_for_ordinary_maps():
    prob = np.zeros((64, 64), np.float32)
    prob[8:24, 8:56] = 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        polygons, scores = DBPostProcessor()(prob)
    assert len(polygons) == 1 and scores[0] == pytest.approx(0.9)


def test_an_unknown_model_name_stored_in_a_checkpoint_names_the_file(tmp_path):
    from dbnetpp.detector import Detector

    path = tmp_path / "odd.pth"
    torch.save({"model": {}, "model_name": "no_such_model", "epoch": 0}, path)
    with pytest.raises(ValueError, match=r"odd.pth names model 'no_such_model'"):
        Detector(path)


@pytest.mark.parametrize("shape", [(1, 3000, 3), (3000, 1, 3), (1, 1, 3)])
def test_extreme_aspect_ratios_are_detected_not_crashed_on(shape, tiny_weights):
    from dbnetpp.detector import Detector

    detector = Detector(tiny_weights, test_scale=(128, 64), prepare=False)
    for polygon, score in detector.detect(np.full(shape, 200, np.uint8)):  # a 1-pixel strip resizes to >= 1 pixel
        assert np.isfinite(polygon).all() and 0 <= score <= 1

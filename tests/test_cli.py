"""The ``dbnetpp`` command line: detect and eval as subprocesses on a model trained in the test
session (``test_detector.train_tiny_checkpoint``), eval of given predictions, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dbnetpp.cli import main, parse_result_file, write_result_file
from dbnetpp.data import ICDAR2015
from dbnetpp.detector import Detector
from dbnetpp.metric import HmeanIoU
from dbnetpp.models.dbnet import build_model

sys.path.insert(0, str(Path(__file__).parent))
from test_detector import best_ious, synthetic_set, train_tiny_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.getbasetemp() / "trained_tiny")


@pytest.fixture(scope="session")
def icdar_synthetic(tmp_path_factory):
    """ICDAR 2015 layout, test split: the training image (img_1) and an unseen one (img_2)."""
    return synthetic_set(2).write_icdar(tmp_path_factory.mktemp("icdar_synthetic"), "test")


def run_cli(*args, timeout=300):
    """``python -m dbnetpp.cli ARGS`` in a fresh process, as a user would run ``dbnetpp``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "dbnetpp.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def json_line(stdout):
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def gt_of(root, split="test"):
    dataset = ICDAR2015(root, split, require_images=False)
    return [dataset.load_annotations(i) for i in range(len(dataset))]


# ----------------------------------------------------------------------------- detect / eval runs


@pytest.mark.slow
def test_detect_writes_results_and_drawings(trained, icdar_synthetic, tmp_path):
    out = tmp_path / "out"
    images = icdar_synthetic / "ch4_test_images"
    proc = run_cli("detect", images, "--weights", trained, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["res_img_1.txt", "res_img_2.txt", "vis_img_1.png", "vis_img_2.png"]

    # res_img_1.txt: Robust Reading lines of 8 integers that find the trained words
    lines = (out / "res_img_1.txt").read_text().splitlines()
    assert lines and all(len(line.split(",")) == 8 for line in lines)
    assert all(v.lstrip("-").isdigit() for line in lines for v in line.split(","))
    polygons, _ = parse_result_file(out / "res_img_1.txt")
    gt = gt_of(icdar_synthetic)[0]
    cared = [p for p, ignored in zip(gt["polygons"], gt["ignore"]) if not ignored]
    assert (best_ious([(p, 1.0) for p in polygons], cared) >= 0.5).mean() >= 0.8

    # the drawing is the input image with outlines on it
    original = cv2.imread(str(images / "img_1.png"))
    drawing = cv2.imread(str(out / "vis_img_1.png"))
    assert drawing.shape == original.shape
    assert (drawing != original).any(axis=2).mean() > 0.005

    # JSON for one image file (in this process): the detector's own polygons and scores
    out_json = tmp_path / "out_json"
    argv = ["detect", images / "img_1.png", "--weights", trained, "--out", out_json, "--format", "json", "--no-vis"]
    assert main([str(a) for a in argv]) == 0
    assert [p.name for p in out_json.iterdir()] == ["res_img_1.json"]
    record = json.loads((out_json / "res_img_1.json").read_text())
    want = Detector(trained).detect(original)
    assert len(record["detections"]) == len(want)
    for det, (polygon, score) in zip(record["detections"], want):
        np.testing.assert_allclose(det["polygon"], polygon, atol=0.01)
        assert det["score"] == pytest.approx(score, abs=1e-6)


@pytest.mark.slow
def test_eval_runs_the_model(trained, icdar_synthetic, tmp_path):
    saved = tmp_path / "saved"
    proc = run_cli(
        "eval", "--data", icdar_synthetic, "--weights", trained, "--save-predictions", saved, "--batch-size", "2"
    )
    assert proc.returncode == 0, proc.stderr
    assert "hmean" in proc.stdout.splitlines()[0]
    result = json_line(proc.stdout)

    # the same numbers computed here from the detector and the metric directly (one batch of 2)
    detector, metric = Detector(trained), HmeanIoU()
    dataset = ICDAR2015(icdar_synthetic, "test")
    samples = [dataset[i] for i in range(len(dataset))]
    for sample, detections in zip(samples, detector.detect_batch([s["image"] for s in samples])):
        metric.update([p for p, _ in detections], [s for _, s in detections], sample["polygons"], sample["ignore"])
    want = metric.compute()
    assert result["num_images"] == 2 and result["split"] == "test"
    assert result["model"] == "dbnet_resnet18_tiny" and result["test_scale"] == [512, 256]
    for key in ("precision", "recall", "hmean"):
        assert result[key] == pytest.approx(want[key])
    assert result["recall"] >= 0.4  # img_1 was learned; img_2 never seen
    assert sorted(p.name for p in saved.iterdir()) == ["res_img_1.txt", "res_img_2.txt"]


def test_saved_predictions_reproduce_the_eval(trained, icdar_synthetic, tmp_path, capsys):
    """eval --save-predictions, then eval --predictions on those files: the same P / R / H and
    threshold (the files keep the exact points and scores); --save-format rrc: plain lines."""
    saved = tmp_path / "scored"
    args = ["eval", "--data", str(icdar_synthetic), "--weights", str(trained), "--batch-size", "2"]
    assert main(args + ["--save-predictions", str(saved)]) == 0
    ran = json_line(capsys.readouterr().out)
    assert main(["eval", "--data", str(icdar_synthetic), "--predictions", str(saved)]) == 0
    scored = json_line(capsys.readouterr().out)
    for key in ("precision", "recall", "hmean", "score_thr", "num_images"):
        assert scored[key] == ran[key], key
    detections = Detector(trained).detect(ICDAR2015(icdar_synthetic, "test")[0]["image"])
    polygons, scores = parse_result_file(saved / "res_img_1.txt")
    assert len(detections) > 0  # (batched with img_2 in the eval: float32 sums may differ by ~1e-7)
    assert sorted(scores) == pytest.approx(sorted(s for _, s in detections), abs=1e-5)

    plain = tmp_path / "rrc"
    assert main(args + ["--save-predictions", str(plain), "--save-format", "rrc"]) == 0
    capsys.readouterr()
    lines = (plain / "res_img_1.txt").read_text().splitlines()
    assert len(lines) == len(detections)
    assert all(len(line.split(",")) == 8 and all(v.lstrip("-").isdigit() for v in line.split(",")) for line in lines)


# ----------------------------------------------------------------------------- eval --predictions


def write_gt_predictions(annotations, directory, drop=()):
    """res_img_N.txt files holding the ground truth itself (minus the (image, polygon) pairs in drop)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, ann in enumerate(annotations):
        kept = [(p, 1.0) for j, p in enumerate(ann["polygons"]) if (i, j) not in drop]
        write_result_file(directory / f"res_{Path(ann['path']).stem}.txt", kept)
    return directory


def eval_predictions(capsys, root, predictions):
    assert main(["eval", "--data", str(root), "--predictions", str(predictions)]) == 0
    return json_line(capsys.readouterr().out)


def test_eval_predictions_equal_to_the_ground_truth(icdar_synthetic, tmp_path, capsys):
    annotations = gt_of(icdar_synthetic)
    result = eval_predictions(capsys, icdar_synthetic, write_gt_predictions(annotations, tmp_path / "all"))
    assert (result["precision"], result["recall"], result["hmean"]) == (1.0, 1.0, 1.0)
    assert result["num_images"] == 2

    # one cared-for word left out: recall (n - 1) / n, precision 1
    first = int(np.flatnonzero(~annotations[0]["ignore"])[0])
    cared = sum(int((~a["ignore"]).sum()) for a in annotations)
    minus_one = write_gt_predictions(annotations, tmp_path / "minus", drop={(0, first)})
    result = eval_predictions(capsys, icdar_synthetic, minus_one)
    assert result["precision"] == 1.0
    assert result["recall"] == pytest.approx((cared - 1) / cared)

    # every box shifted by its own width: nothing matches
    shifted = [dict(a, polygons=[p + [np.ptp(p[:, 0]), 0] for p in a["polygons"]]) for a in annotations]
    result = eval_predictions(capsys, icdar_synthetic, write_gt_predictions(shifted, tmp_path / "shifted"))
    assert result["hmean"] == 0.0


def test_eval_predictions_on_icdar2015(icdar_root, tmp_path, capsys):
    annotations = gt_of(icdar_root)
    result = eval_predictions(capsys, icdar_root, write_gt_predictions(annotations, tmp_path / "gt"))
    assert (result["precision"], result["recall"], result["hmean"]) == (1.0, 1.0, 1.0)
    assert result["num_images"] == len(annotations)


def test_result_file_round_trip(tmp_path):
    quad = np.array([[10.4, 20.6], [50.2, 20.1], [50.0, 40.0], [10.0, 40.0]], np.float32)
    # counter-clockwise on screen and with 6 points: written clockwise, rounded
    hexagon = np.array([[0, 0], [0, 10], [10, 20], [20, 10], [20, 0], [10, -10]], np.float32)
    write_result_file(tmp_path / "res_a.txt", [(quad, 0.9), (hexagon, 0.8)])
    assert (tmp_path / "res_a.txt").read_text().splitlines() == [
        "10,21,50,20,50,40,10,40",
        "10,-10,20,0,20,10,10,20,0,10,0,0",
    ]
    polygons, scores = parse_result_file(tmp_path / "res_a.txt")
    assert scores == [1.0, 1.0] and [p.shape for p in polygons] == [(4, 2), (6, 2)]
    # Robust Reading lines with a confidence
    (tmp_path / "res_b.txt").write_text("1,2,3,2,3,4,1,4,0.75\n\n5,6,7,6,7,8,5,8\n")
    polygons, scores = parse_result_file(tmp_path / "res_b.txt")
    assert scores == [0.75, 1.0] and polygons[1].tolist() == [[5, 6], [7, 6], [7, 8], [5, 8]]
    write_result_file(tmp_path / "res_c.json", [(quad, 0.9)], fmt="json")
    polygons, scores = parse_result_file(tmp_path / "res_c.json")
    np.testing.assert_allclose(polygons[0], quad, atol=0.005)
    assert scores == [pytest.approx(0.9)]


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (d / "empty_folder").mkdir()
    (d / "notes.txt").write_text("no images here")
    (d / "only_text").mkdir()
    (d / "only_text" / "readme.md").write_text("still no images")
    torch.manual_seed(0)
    tiny = build_model("dbnet_resnet18_tiny")
    # good weights (untrained: these tests need no trained model)
    torch.save({"model": tiny.state_dict(), "model_name": tiny.name, "epoch": 0}, d / "tiny.pth")
    # MMOCR-style checkpoint of the tiny model: does not fit the default DBNet++ R50-DCNv2
    torch.save({"state_dict": tiny.state_dict()}, d / "other_model.pth")
    (d / "preds").mkdir()
    (d / "preds" / "res_img_1.txt").write_text("1,2,3,4,five,6,7,8\n")
    return d


def bad_cases(d, data):
    weights = d / "tiny.pth"
    missing, images, other = d / "missing_weights.pth", data / "ch4_test_images", d / "other_model.pth"
    return {
        "unreadable image": (["detect", d / "broken.jpg", "--weights", weights, "--out", d / "o1"], "broken.jpg"),
        "wrong model": (["detect", images, "--weights", other, "--out", d / "o2"], "other_model.pth"),
        "empty folder": (["detect", d / "empty_folder", "--weights", weights, "--out", d / "o3"], "empty_folder"),
        "folder without images": (["detect", d / "only_text", "--weights", weights, "--out", d / "o4"], "only_text"),
        "missing image": (["detect", d / "nope.jpg", "--weights", weights, "--out", d / "o5"], "nope.jpg"),
        "missing weights": (["detect", images, "--weights", missing, "--out", d / "o6"], "missing_weights.pth"),
        "eval missing weights": (["eval", "--data", data, "--weights", missing], "missing_weights.pth"),
        "eval missing data": (["eval", "--data", d / "no_data", "--weights", weights], "no_data"),
        "eval bad prediction": (["eval", "--data", data, "--predictions", d / "preds"], "res_img_1.txt:1"),
        "eval not a checkpoint": (["eval", "--data", data, "--weights", d / "notes.txt"], "notes.txt"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unreadable image",
        "wrong model",
        "empty folder",
        "folder without images",
        "missing image",
        "missing weights",
        "eval missing weights",
        "eval missing data",
        "eval bad prediction",
        "eval not a checkpoint",
    ],
)
def test_bad_input_is_one_error_line(case, bad_inputs, icdar_synthetic, capsys):
    argv, name = bad_cases(bad_inputs, icdar_synthetic)[case]
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status != 0
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert error_lines and name in error_lines[0], err
    assert "Traceback" not in err


def test_bad_input_in_a_subprocess(bad_inputs, icdar_synthetic):
    proc = run_cli("eval", "--data", icdar_synthetic, "--weights", bad_inputs / "missing_weights.pth")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "missing_weights.pth" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wrong_model_message_names_file_and_model(bad_inputs, icdar_synthetic, capsys):
    images, other = icdar_synthetic / "ch4_test_images", bad_inputs / "other_model.pth"
    argv = ["detect", images, "--weights", other, "--out", bad_inputs / "o"]
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "other_model.pth" in err and "dbnetpp_resnet50_dcnv2" in err and "missing keys" in err


# ----------------------------------------------------------------------------- --model brings its recipe


@pytest.fixture(scope="module")
def mmocr_r18(tmp_path_factory):
    """An MMOCR-format checkpoint of the DBNet R18 architecture (random weights)."""
    from helpers import random_state_dict

    keys = {k: v.shape for k, v in build_model("dbnet_resnet18").state_dict().items()}
    path = tmp_path_factory.mktemp("mmocr_r18") / "dbnet_r18.pth"
    torch.save({"meta": {"epoch": 1200}, "state_dict": random_state_dict(keys)}, path)
    return path


@pytest.fixture
def settings_seen(monkeypatch):
    """Records (test_scale, epsilon_ratio, text_repr_type) of every Detector that detects."""
    seen = []
    original = Detector.detect_batch

    def spy(self, images):
        pp = self.postprocessor
        seen.append((self.test_scale, pp.epsilon_ratio, pp.text_repr_type))
        return original(self, images)

    monkeypatch.setattr(Detector, "detect_batch", spy)
    return seen


R18_RECIPE = "dbnet_resnet18_fpnc_1200e_icdar2015"


def test_detect_with_a_recipe_name_uses_its_test_settings(mmocr_r18, icdar_synthetic, tmp_path, settings_seen):
    image = icdar_synthetic / "ch4_test_images" / "img_1.png"
    args = ["detect", str(image), "--weights", str(mmocr_r18), "--no-vis"]
    assert main([*args, "--model", R18_RECIPE, "--out", str(tmp_path / "a")]) == 0
    assert settings_seen[-1] == ((1333, 736), 0.01, "quad")  # MMOCR's DBNet R18 test pipeline
    assert main([*args, "--model", R18_RECIPE, "--test-scale", "640,320", "--out", str(tmp_path / "b")]) == 0
    assert settings_seen[-1] == ((640, 320), 0.01, "quad")  # an explicit flag wins


def test_eval_with_a_recipe_name_uses_its_test_settings(mmocr_r18, icdar_synthetic, capsys, settings_seen):
    assert main(["eval", "--data", str(icdar_synthetic), "--weights", str(mmocr_r18), "--model", R18_RECIPE]) == 0
    assert settings_seen and set(settings_seen) == {((1333, 736), 0.01, "quad")}
    assert json_line(capsys.readouterr().out)["test_scale"] == [1333, 736]

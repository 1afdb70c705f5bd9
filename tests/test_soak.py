"""Long runs keep a flat resident memory: ``dbnetpp detect`` over many images and a short training
run, sampled after every image / step (small counts here; ``benchmarks/soak.py`` for the long
figures). Linux only (/proc/self/status); a tolerant bound, no timing."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import load_train_script

import dbnetpp.cli as cli
from dbnetpp.models.dbnet import build_model

STATUS = Path("/proc/self/status")
pytestmark = pytest.mark.skipif(not STATUS.exists(), reason="needs /proc/self/status (Linux)")


def rss_mib() -> float:
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def assert_flat(samples, warmup: int, slack_mib: float) -> None:
    """After ``warmup`` samples, memory never rises more than ``slack_mib`` above the warm level,
    and the second half's median is no more than half of that above the first half's."""
    assert len(samples) > warmup + 4, samples
    after = np.array(samples[warmup:])
    half = len(after) // 2
    assert after.max() - after[0] <= slack_mib, samples
    assert np.median(after[half:]) - np.median(after[:half]) <= slack_mib / 2, samples


def test_detect_over_many_images_keeps_a_flat_rss(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(48):  # sizes vary: every padded size the resize gives is seen in the warm-up too
        h, w = (96, 128) if i % 2 else (128, 96)
        cv2.imwrite(str(folder / f"img_{i}.jpg"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    torch.manual_seed(0)
    model = build_model("dbnet_resnet18_tiny")
    weights = tmp_path / "tiny.pth"
    torch.save({"model": model.state_dict(), "model_name": model.name, "epoch": 0}, weights)

    samples = []
    write = cli.write_result_file

    def write_and_sample(*args, **kwargs):
        write(*args, **kwargs)
        samples.append(rss_mib())

    monkeypatch.setattr(cli, "write_result_file", write_and_sample)
    status = cli.main(["detect", str(folder), "--weights", str(weights), "--out", str(tmp_path / "out"),
                       "--test-scale", "128,128"])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    assert len(samples) == 48
    assert_flat(samples, warmup=8, slack_mib=24)


@pytest.mark.slow
def test_a_training_run_keeps_a_flat_rss(tmp_path, monkeypatch, capsys):
    train = load_train_script("dbnetpp_train_script_soak")
    samples = []

    class SampledLoss(train.DBLoss):
        def forward(self, outputs, targets):
            samples.append(rss_mib())
            return super().forward(outputs, targets)

    monkeypatch.setattr(train, "DBLoss", SampledLoss)
    status = train.run([
        "--preset", "tiny_dbnet", "--synthetic-images", "8", "2", "--train-size", "64", "--test-scale", "64", "64",
        "--batch-size", "2", "--max-iters", "48", "--eval-interval", "16", "--no-progress", "--threads", "1",
        "--workers", "0", "--work-dir", str(tmp_path / "w"),
    ])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    assert len(samples) == 48, len(samples)
    assert_flat(samples, warmup=12, slack_mib=32)

"""examples/train.py end to end: torchrun on 2 CPU processes, exact resume, NaN stop, LR scaling."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

from dbnetpp.checkpoint import read_checkpoint
from dbnetpp.config import PRESETS
from dbnetpp.meters import read_jsonl
from dbnetpp.models.dbnet import build_model
from dbnetpp.schedules import lr_at_step

ROOT = Path(__file__).resolve().parents[1]
TINY_LR = PRESETS["tiny_dbnet"].train.lr  # quoted for the preset's base batch of 8
SCRIPT = ROOT / "examples" / "train.py"

# A few seconds per run: 16 synthetic training images cropped to 128 px, 4 held out.
MICRO = [
    "--preset", "tiny_dbnet", "--synthetic-images", "16", "4", "--train-size", "128",
    "--batch-size", "4", "--log-interval", "2", "--no-progress",
]  # fmt: skip


def run_main(train_module, *argv):
    args = train_module.get_args_parser().parse_args(list(argv))
    return train_module.main(args)


def assert_tensors_close(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, path
        if a.is_floating_point():
            assert (a - b).abs().max().item() <= 1e-6, path
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_tensors_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tensors_close(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.slow
def test_torchrun_two_processes_tiny_preset_one_epoch(tmp_path):
    work = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(SCRIPT), "--preset", "tiny_dbnet", "--epochs", "1", "--work-dir", str(work), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ckpt = torch.load(work / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["model_name"] == "dbnet_resnet18_tiny"
    assert len(ckpt["rng"]) == 2  # one RNG state per rank
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # distinct seeds per rank
    assert ckpt["config"]["run"]["world_size"] == 2
    assert (work / "best.pth").is_file()

    records = read_jsonl(work / "log.jsonl")
    evals = [r for r in records if r["type"] == "eval"]
    assert len(evals) == 1 and {"precision", "recall", "hmean"} <= set(evals[0])
    assert evals[0]["num_images"] == 64  # every held-out image once, none twice
    p, r = evals[0]["precision"], evals[0]["recall"]  # H-mean is their harmonic mean (0 when both are)
    assert evals[0]["hmean"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0, abs=1e-12)
    train = [r for r in records if r["type"] == "train"]
    assert train and {"loss", "loss_prob", "loss_thr", "loss_db", "lr", "images_per_s", "data_time"} <= set(train[0])
    # 2 processes x 8 images = 16 = twice the preset's base batch: the LR doubles, and is logged
    assert all(r["lr"] == pytest.approx(2 * TINY_LR) for r in train)
    assert json.loads((work / "config.json").read_text())["run"]["lr_scaled"] == pytest.approx(2 * TINY_LR)
    assert f"lr {2 * TINY_LR:g} = {TINY_LR:g} x total batch 16 / 8" in proc.stdout

    png = cv2.imread(str(work / "curves.png"))
    assert png is not None and png.ndim == 3 and png.shape[0] > 100


@pytest.mark.slow
def test_exact_resume_equals_straight_run(tmp_path, train_module, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [*MICRO, "--epochs", "2", "--eval-interval", "100", "--ema-decay", "0.9"]
    run_main(train_module, *common, "--work-dir", str(straight))

    real_train_one_epoch = train_module.train_one_epoch

    def killed_in_epoch_1(*args, **kwargs):
        if args[5] == 1:  # the epoch argument
            raise KeyboardInterrupt("simulated kill during epoch 1")
        return real_train_one_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", killed_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run_main(train_module, *common, "--work-dir", str(resumed))
    monkeypatch.undo()
    after_epoch0 = read_checkpoint(resumed / "last.pth")
    assert after_epoch0["epoch"] == 0

    run_main(train_module, *common, "--work-dir", str(resumed), "--resume", str(resumed / "last.pth"))

    a, b = read_checkpoint(straight / "last.pth"), read_checkpoint(resumed / "last.pth")
    assert a["epoch"] == b["epoch"] == 1
    for key in ("model", "ema", "optimizer", "global_step", "rng", "sampler", "scaler", "best_hmean"):
        assert_tensors_close(a[key], b[key], key)
    # epoch 1 did move the weights: the comparison is not vacuous
    floats = [k for k, v in a["model"].items() if v.is_floating_point()]
    moved = max((after_epoch0["model"][k] - a["model"][k]).abs().max().item() for k in floats)
    assert moved > 1e-4

    # the schedule used the overridden length (2 epochs) with the scaled LR (4 / 8 x the preset's)
    lrs = sorted({(r["epoch"], r["lr"]) for r in read_jsonl(straight / "log.jsonl") if r["type"] == "train"})
    cfg = train_module.config_from_args(train_module.get_args_parser().parse_args(common))
    want = [(e, pytest.approx(lr_at_step(cfg, e * 4, 4) * 4 / 8)) for e in (0, 1)]  # 16 images / 4 = 4 steps
    assert lrs == want and lrs[0][1] == pytest.approx(TINY_LR * 4 / 8)


@pytest.mark.slow
def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, train_module, monkeypatch, capsys):
    base_loss = train_module.DBLoss
    iters_per_epoch = 16 // 4
    bad_call = iters_per_epoch + 1  # epoch 1, iteration 1

    class NaNLoss(base_loss):
        calls = 0

        def forward(self, outputs, targets):
            losses = super().forward(outputs, targets)
            if NaNLoss.calls == bad_call:
                losses["loss"] = losses["loss"] * float("nan")
            NaNLoss.calls += 1
            return losses

    monkeypatch.setattr(train_module, "DBLoss", NaNLoss)
    work = tmp_path / "nan"
    status = train_module.run([*MICRO, "--epochs", "3", "--eval-interval", "100", "--work-dir", str(work)])
    assert status == 1
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 1, iteration 1" in err and "last.pth" in err

    last = read_checkpoint(work / "last.pth")
    assert last["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert sorted(p.name for p in work.iterdir() if p.name.endswith(".tmp")) == []


@pytest.mark.slow
def test_lr_scaling_flag_and_test_only_with_load_from(tmp_path, train_module):
    trained = tmp_path / "trained"
    result = run_main(train_module, *MICRO, "--epochs", "1", "--work-dir", str(trained))
    config = json.loads((trained / "config.json").read_text())
    assert config["run"]["lr_scaled"] == pytest.approx(TINY_LR * 4 / 8)
    assert config["train"]["scale_lr"] is True

    plain = tmp_path / "plain"
    again = run_main(
        train_module, *MICRO, "--no-scale-lr", "--test-only", "--load-from", str(trained / "last.pth"),
        "--work-dir", str(plain),
    )  # fmt: skip
    config = json.loads((plain / "config.json").read_text())
    assert config["run"]["lr_scaled"] == pytest.approx(TINY_LR) and config["train"]["scale_lr"] is False
    # evaluating the saved weights reproduces the training run's evaluation
    for key in ("precision", "recall", "hmean", "num_images"):
        assert again[key] == pytest.approx(result[key])
    assert [r["type"] for r in read_jsonl(plain / "log.jsonl")] == ["config", "eval"]
    assert not any(p.suffix == ".pth" for p in plain.iterdir())


def test_bad_arguments_fail_early(train_module):
    parser = train_module.get_args_parser()
    with pytest.raises(ValueError, match="train_size must be a multiple of 32"):
        train_module.config_from_args(parser.parse_args(["--train-size", "100"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--optimizer", "rmsprop"])
    cfg = train_module.config_from_args(parser.parse_args(["--preset", "tiny", "--epochs", "3", "--no-scale-lr"]))
    got = (cfg.model.name, cfg.train.epochs, cfg.train.scale_lr, cfg.train.optimizer)
    assert got == ("dbnetpp_resnet18_dcnv2_tiny", 3, False, "adam")  # the main job trains a small DBNet++
    tiny = PRESETS["tiny"]
    cfg = train_module.config_from_args(parser.parse_args(["--preset", "tiny_dbnetpp"]))
    assert cfg.model.name == "dbnetpp_resnet18_dcnv2_tiny" and cfg.data == tiny.data and cfg.train == tiny.train
    # the small DBNet: same images and LR per image; batch 8 for 14 epochs, where the DBNet++ runs batch 4 for
    # 12 with crops of at least half the image (MMOCR's 0.1 for the DBNet), tested at 1.25x, with an EMA
    cfg = train_module.config_from_args(parser.parse_args(["--preset", "tiny_dbnet"]))
    assert cfg.model.name == "dbnet_resnet18_tiny"
    assert (cfg.data.crop_min_side_ratio, tiny.data.crop_min_side_ratio) == (0.1, 0.5)
    assert (cfg.data.test_scale, tiny.data.test_scale) == ((512, 256), (640, 320))
    assert dataclasses.replace(cfg.data, crop_min_side_ratio=0.5, test_scale=(640, 320)) == tiny.data
    assert (cfg.train.batch_size, cfg.train.epochs, tiny.train.batch_size, tiny.train.epochs) == (8, 14, 4, 12)
    assert math.isclose(cfg.train.lr / cfg.train.base_batch_size, tiny.train.lr / tiny.train.base_batch_size)
    same_schedule = dict(batch_size=4, base_batch_size=4, lr=tiny.train.lr, epochs=12, ema_decay=0.995)
    assert dataclasses.replace(cfg.train, **same_schedule) == tiny.train
    default = train_module.config_from_args(parser.parse_args([]))
    t = default.train
    assert (default.model.name, t.optimizer, t.lr, t.momentum, t.weight_decay, t.epochs, t.batch_size) == (
        "dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015", "sgd", 0.007, 0.9, 1e-4, 1200, 16,
    )  # fmt: skip
    assert (t.lr_power, t.lr_min, t.eval_interval, t.save_interval, tuple(default.data.test_scale)) == (
        0.9, 1e-7, 20, 20, (4068, 1024),
    )  # fmt: skip
    assert math.isclose(t.lr, 0.007)


def test_recipes_keep_their_lr_unless_auto_scale_lr(train_module):
    """MMOCR's recipes do not scale the LR with the total batch (MMOCR scales only under
    --auto-scale-lr); the flag of the same name turns scaling on, and contradicting flags fail."""
    parser = train_module.get_args_parser()
    recipe = "dbnetpp_resnet50_fpnc_1200e_icdar2015"
    assert train_module.config_from_args(parser.parse_args(["--preset", recipe])).train.scale_lr is False
    scaled = train_module.config_from_args(parser.parse_args(["--preset", recipe, "--auto-scale-lr"]))
    assert scaled.train.scale_lr is True and scaled.train.lr == 0.003
    with pytest.raises(ValueError, match="contradict"):
        train_module.check_args(parser.parse_args(["--no-scale-lr", "--auto-scale-lr"]))


def test_tiny_preset_trains_channels_last_on_the_cpu(train_module, tmp_path):
    """The main job runs NHWC on the CPU (oneDNN's faster path); its checkpoint loads into a plain
    NCHW model with the same eval output, and --no-channels-last turns the format off."""
    parser = train_module.get_args_parser()
    assert train_module.config_from_args(parser.parse_args(["--preset", "tiny"])).model.channels_last is True
    off = train_module.config_from_args(parser.parse_args(["--preset", "tiny", "--no-channels-last"]))
    assert off.model.channels_last is False
    assert train_module.config_from_args(parser.parse_args(["--preset", "tiny_dbnet"])).model.channels_last is False

    work = tmp_path / "run"
    run_main(
        train_module, "--preset", "tiny", "--synthetic-images", "8", "2", "--train-size", "64",
        "--test-scale", "128", "64", "--epochs", "1", "--work-dir", str(work), "--no-progress",
    )  # fmt: skip
    assert json.loads((work / "config.json").read_text())["model"]["channels_last"] is True
    state = read_checkpoint(work / "last.pth")["model"]
    conv = state["backbone.layer1.0.conv1.weight"]
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()

    plain = build_model("dbnetpp_resnet18_dcnv2_tiny").eval()
    plain.load_state_dict(state)
    nhwc = build_model("dbnetpp_resnet18_dcnv2_tiny").eval()
    nhwc.load_state_dict(state)
    nhwc = nhwc.to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = plain(x), nhwc(x.contiguous(memory_format=torch.channels_last))
    assert a.shape == (1, 96, 128) and (a - b).abs().max().item() < 1e-5

"""CPU-runnable options of examples/train.py on the tiny model: --amp bf16, --channels-last,
fp16 rejected on the CPU, the --sync-bn guard, resume with a GradScaler state.

Each run is a few seconds (MICRO of test_train_script: 16 synthetic images at 128 px)."""

import math
import sys
import time
from pathlib import Path

import pytest
import torch

from dbnetpp.checkpoint import read_checkpoint, save_checkpoint
from dbnetpp.distributed import DistInfo
from dbnetpp.engine import make_grad_scaler
from dbnetpp.meters import read_jsonl

sys.path.insert(0, str(Path(__file__).parent))
from test_train_script import MICRO, run_main  # noqa: E402

ONE_EPOCH = [*MICRO, "--epochs", "1", "--eval-interval", "1", "--threads", "1"]


def train_records(work):
    return [r for r in read_jsonl(work / "log.jsonl") if r["type"] == "train"]


def float_state(path):
    return {k: v for k, v in read_checkpoint(path)["model"].items() if v.is_floating_point()}


@pytest.mark.slow
def test_amp_bf16_trains_with_finite_loss_and_differs_from_fp32(tmp_path, train_module):
    bf16, fp32 = tmp_path / "bf16", tmp_path / "fp32"
    result = run_main(train_module, *ONE_EPOCH, "--amp", "bf16", "--work-dir", str(bf16))
    run_main(train_module, *ONE_EPOCH, "--work-dir", str(fp32))
    records = train_records(bf16)
    assert records and all(math.isfinite(r["loss"]) for r in records)
    assert {"precision", "recall", "hmean"} <= set(result)
    a, b = float_state(bf16 / "last.pth"), float_state(fp32 / "last.pth")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in a.values())  # master weights
    # autocast really ran in bfloat16 (8-bit mantissa): same direction, not the same numbers
    losses = [r["loss"] for r in records], [r["loss"] for r in train_records(fp32)]
    assert losses[0] != losses[1]
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert losses[0] == pytest.approx(losses[1], rel=0.05)


def test_channels_last_step_equals_the_plain_step():
    """The tiny model on a synthetic training batch: channels_last model and input (what
    --channels-last does) give the plain DBLoss value and parameter gradients. In float64, so
    that float32 rounding (amplified by the binarisation's k = 50 and by batch-norm
    cancellations, ~3 % of a gradient) cannot hide a real layout bug."""
    from dbnetpp.data import SyntheticText, TrainDataset, collate_train
    from dbnetpp.engine import _to_device
    from dbnetpp.loss import DBLoss
    from dbnetpp.models.dbnet import build_model

    torch.manual_seed(0)
    plain = build_model("dbnet_resnet18_tiny").train().double()
    nhwc = build_model("dbnet_resnet18_tiny").train().double()
    nhwc.load_state_dict(plain.state_dict())
    nhwc = nhwc.to(memory_format=torch.channels_last)
    data = TrainDataset(SyntheticText(2, (160, 224), seed=1), size=128, seed=0)
    batch = collate_train([data[0], data[1]])
    results = []
    for model, channels_last in ((plain, False), (nhwc, True)):
        inputs = _to_device(batch, torch.device("cpu"), channels_last=channels_last)
        inputs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
        images = inputs.get("images", inputs.get("image"))
        assert images.is_contiguous(memory_format=torch.channels_last) == channels_last
        loss = DBLoss()(model(images), inputs)["loss"]
        loss.backward()
        results.append((loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-10)
    scale = max(g.abs().max().item() for g in grads_a.values())
    assert scale > 0
    for k in grads_a:
        # a conv bias followed by batch norm has a gradient of exactly 0: compare to the largest one
        assert (grads_b[k] - grads_a[k]).abs().max().item() <= 1e-9 * scale, k


@pytest.mark.slow
def test_channels_last_training_run(tmp_path, train_module):
    """The same run with and without --channels-last: finite, close losses (Adam's first steps
    amplify float32 noise in near-zero gradients, so the weights are not compared)."""
    plain, nhwc = tmp_path / "plain", tmp_path / "nhwc"
    run_main(train_module, *ONE_EPOCH, "--eval-interval", "100", "--work-dir", str(plain))
    run_main(train_module, *ONE_EPOCH, "--eval-interval", "100", "--channels-last", "--work-dir", str(nhwc))
    la, lb = [r["loss"] for r in train_records(plain)], [r["loss"] for r in train_records(nhwc)]
    assert len(la) == len(lb) > 0 and all(math.isfinite(v) for v in lb)
    assert lb == pytest.approx(la, rel=1e-2)


def test_amp_fp16_on_the_cpu_is_rejected(tmp_path, train_module):
    with pytest.raises(ValueError, match="--amp fp16 needs CUDA"):
        run_main(train_module, *ONE_EPOCH, "--amp", "fp16", "--work-dir", str(tmp_path / "fp16"))
    assert not (tmp_path / "fp16").exists()  # rejected before anything is written


def test_sync_bn_guard(tmp_path, train_module):
    """Several CPU processes with --sync-bn: a clear error before any work (SyncBatchNorm is
    CUDA-only); a single process ignores the flag (nothing to synchronise)."""
    args = train_module.get_args_parser().parse_args([*ONE_EPOCH, "--sync-bn", "--work-dir", str(tmp_path / "s")])
    two_cpu_ranks = DistInfo(rank=0, world_size=2, local_rank=0, local_world_size=2, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="--sync-bn needs CUDA"):
        train_module._run(args, train_module.config_from_args(args), two_cpu_ranks, time.perf_counter())
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_sync_bn_single_process_trains_as_without(tmp_path, train_module):
    run_main(train_module, *ONE_EPOCH, "--eval-interval", "100", "--sync-bn", "--work-dir", str(tmp_path / "a"))
    run_main(train_module, *ONE_EPOCH, "--eval-interval", "100", "--work-dir", str(tmp_path / "b"))
    a, b = float_state(tmp_path / "a" / "last.pth"), float_state(tmp_path / "b" / "last.pth")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_grad_scaler_state_round_trip():
    """An enabled scaler's state survives state_dict -> checkpoint file -> load_state_dict."""
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch < 2.3: GradScaler scales on CUDA only")
    scaler = make_grad_scaler(torch.device("cpu"), enabled=True)
    scaler.scale(torch.ones(1))  # creates the scale tensor
    scaler.update(new_scale=1024.0)
    state = scaler.state_dict()
    assert state["scale"] == 1024.0
    other = make_grad_scaler(torch.device("cpu"), enabled=True)
    other.load_state_dict(state)
    assert other.get_scale() == 1024.0 and other.state_dict() == state
    assert make_grad_scaler(torch.device("cpu"), enabled=False).state_dict() == {}


@pytest.mark.slow
def test_resume_from_a_checkpoint_with_a_grad_scaler_state(tmp_path, train_module):
    """A checkpoint written by an fp16 (CUDA) run carries the GradScaler's state: a CPU run
    (fp32 or bf16, scaler disabled) resumes from it and trains on."""
    work = tmp_path / "run"
    common = [*MICRO, "--epochs", "2", "--eval-interval", "100", "--threads", "1", "--work-dir", str(work)]
    run_main(train_module, *common, "--epochs", "1")
    ckpt = read_checkpoint(work / "last.pth")
    ckpt["scaler"] = {"scale": 8192.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                      "_growth_tracker": 17}
    save_checkpoint(ckpt, work / "fp16.pth")
    run_main(train_module, *common, "--amp", "bf16", "--resume", str(work / "fp16.pth"))
    after = read_checkpoint(work / "last.pth")
    assert after["epoch"] == 1
    epochs = sorted({r["epoch"] for r in train_records(work)})
    assert epochs == [0, 1] and all(math.isfinite(r["loss"]) for r in train_records(work))

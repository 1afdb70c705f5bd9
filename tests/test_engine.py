import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dbnetpp.engine import (
    NonFiniteLossError,
    _padding_flags,
    build_optimizer,
    evaluate,
    scaled_lr,
    train_one_epoch,
)
from dbnetpp.metric import HmeanIoU


def test_scaled_lr_is_linear_in_total_batch():
    assert scaled_lr(0.007, 16, 16) == 0.007
    assert scaled_lr(0.007, 32, 16) == pytest.approx(0.014)
    assert scaled_lr(1e-3, 4, 8) == pytest.approx(5e-4)
    with pytest.raises(ValueError):
        scaled_lr(0.007, 0, 16)


def test_build_optimizer_recipe():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    sgd = build_optimizer(model, "sgd", 0.007, momentum=0.9, weight_decay=1e-4)
    group = sgd.param_groups[0]
    assert isinstance(sgd, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.007, 0.9, 1e-4)
    assert len(group["params"]) == 4  # decay on conv, bias and BN parameters alike
    assert isinstance(build_optimizer(model, "adam", 1e-3), torch.optim.Adam)
    assert isinstance(build_optimizer(model, "adamw", 1e-3), torch.optim.AdamW)
    with pytest.raises(ValueError, match="rmsprop"):
        build_optimizer(model, "rmsprop", 1e-3)


class Linear2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)

    def forward(self, x):
        return {"out": self.conv(x).squeeze(1)}


class NaNAt:
    """MSE loss that turns NaN at the given (0-based) call."""

    def __init__(self, bad_call: int) -> None:
        self.bad_call = bad_call
        self.calls = 0

    def __call__(self, outputs, targets):
        loss = ((outputs["out"] - targets["target"]) ** 2).mean()
        if self.calls == self.bad_call:
            loss = loss * float("nan")
        self.calls += 1
        return {"loss": loss, "loss_prob": loss.detach() * 0.5}


class Recorder:
    def __init__(self) -> None:
        self.records = []

    def log(self, r):
        self.records.append(dict(r))


def batches(n, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"images": torch.randn(batch, 3, 4, 4, generator=g), "target": torch.randn(batch, 4, 4, generator=g)}
        for _ in range(n)
    ]


def test_train_one_epoch_logs_every_interval_and_returns_means():
    torch.manual_seed(0)
    model = Linear2d()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    log = Recorder()
    summary = train_one_epoch(
        model, NaNAt(-1), opt, batches(5), torch.device("cpu"), 3, log_interval=2, logger=log, progress=False
    )
    assert [r["iter"] for r in log.records] == [2, 4, 5]
    assert [r["step"] for r in log.records] == [3 * 5 + 2, 3 * 5 + 4, 3 * 5 + 5]
    for r in log.records:
        assert r["type"] == "train" and r["epoch"] == 3 and r["iters"] == 5 and r["lr"] == 0.01
        assert r["loss_prob"] == pytest.approx(0.5 * r["loss"])
        assert r["images_per_s"] > 0 and r["data_time"] >= 0 and r["compute_time"] > 0 and r["elapsed_s"] > 0
    # epoch mean = mean of the window means weighted by window length
    weighted = (2 * log.records[0]["loss"] + 2 * log.records[1]["loss"] + log.records[2]["loss"]) / 5
    assert summary["loss"] == pytest.approx(weighted)


def test_lr_is_set_before_every_step_and_the_loop_stops_where_asked():
    torch.manual_seed(0)
    model = Linear2d()
    opt = torch.optim.SGD(model.parameters(), lr=123.0)
    used, calls = [], []

    class SpySGD(torch.optim.SGD):
        def step(self, closure=None):
            used.append(self.param_groups[0]["lr"])
            return super().step(closure)

    opt = SpySGD(model.parameters(), lr=123.0)
    log = Recorder()
    summary = train_one_epoch(
        model, NaNAt(-1), opt, batches(6), torch.device("cpu"), 2, log_interval=1, logger=log, progress=False,
        lr_at=lambda s: 0.1 / (s + 1), start_iter=3, global_step=20, iters_per_epoch=9, max_steps=25,
        after_step=lambda it, step: calls.append((it, step)),
    )  # fmt: skip
    # steps 20..24 (max_steps 25 stops after 5 of the 6 batches), each with lr_at(step)
    assert used == [0.1 / (s + 1) for s in range(20, 25)]
    assert [r["lr"] for r in log.records] == used
    assert [(r["iter"], r["step"], r["iters"]) for r in log.records] == [(i + 1, s + 1, 9) for i, s in
                                                                         zip(range(3, 8), range(20, 25))]
    assert calls == [(i + 1, s + 1) for i, s in zip(range(3, 8), range(20, 25))]
    assert (summary["iterations"], summary["iter_in_epoch"], summary["global_step"]) == (5, 8, 25)
    assert not summary["epoch_done"] and not summary["stopped"]

    flags = iter([False, True, False])
    summary = train_one_epoch(
        model, NaNAt(-1), opt, batches(6), torch.device("cpu"), 0, progress=False, stop_requested=lambda: next(flags)
    )
    assert (summary["iterations"], summary["stopped"], summary["epoch_done"]) == (2, True, False)
    summary = train_one_epoch(model, NaNAt(-1), opt, [], torch.device("cpu"), 4, start_iter=6, iters_per_epoch=6,
                              progress=False)  # fmt: skip
    assert (summary["iterations"], summary["epoch_done"], summary["global_step"]) == (0, True, 30)


def test_nan_loss_stops_before_the_step_naming_epoch_and_iteration():
    torch.manual_seed(0)
    model = Linear2d()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = batches(4)
    snapshots = []

    class Snapshot(list):
        def __iter__(self):
            for b in super().__iter__():
                snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
                yield b

    with pytest.raises(NonFiniteLossError, match=r"epoch 7, iteration 2") as info:
        train_one_epoch(model, NaNAt(2), opt, Snapshot(data), torch.device("cpu"), 7, progress=False)
    assert (info.value.epoch, info.value.iteration) == (7, 2)
    assert math.isnan(info.value.losses["loss"])
    # weights are those from before the bad batch: the NaN never reached the optimiser
    after = model.state_dict()
    assert all(torch.equal(after[k], snapshots[2][k]) for k in after)
    assert not torch.equal(snapshots[2]["conv.weight"], snapshots[0]["conv.weight"])


def test_gradient_clipping_bounds_the_update():
    torch.manual_seed(0)
    model = Linear2d()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    big = [{"images": torch.full((2, 3, 4, 4), 100.0), "target": torch.zeros(2, 4, 4)}]
    train_one_epoch(model, NaNAt(-1), opt, big, torch.device("cpu"), 0, clip_grad=0.1, progress=False)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert step.norm() == pytest.approx(0.1, rel=1e-4)  # the raw gradient is far larger: clipped to 0.1


class Boxes(Dataset):
    """Image i is filled with i; its ground truth is one box, one '###' box."""

    def __len__(self):
        return 7

    def __getitem__(self, i):
        box = np.array([[4, 4], [40, 4], [40, 20], [4, 20]], np.float32) + i
        ignored = np.array([[60, 60], [90, 60], [90, 80], [60, 80]], np.float32)
        image = torch.full((3, 32, 32), float(i))
        return {"image": image, "polygons": [box, ignored], "ignore": np.array([False, True])}


def collate(samples):
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "scale": [(2.0, 2.0)] * len(samples),
        "polygons": [s["polygons"] for s in samples],
        "ignore": [s["ignore"] for s in samples],
    }


def fake_pp(prob_map, scale=None):
    """Predicts image i's box when i % 3 != 0,
    plus a detection inside the ignored box (which must not count as a false positive)."""
    assert scale == (2.0, 2.0)  # the test-resize factors reach the post-processor
    i = int(round(float(prob_map[0, 0])))
    polys = [np.array([[61, 61], [89, 61], [89, 79], [61, 79]], np.float32)]
    if i % 3:
        polys.append(np.array([[4, 4], [40, 4], [40, 20], [4, 20]], np.float32) + i)
    return polys, [0.95] * len(polys)


def test_evaluate_single_process_hand_computed():
    loader = DataLoader(Boxes(), batch_size=3, collate_fn=collate)
    result = evaluate(lambda x: x[:, 0], loader, torch.device("cpu"), fake_pp, HmeanIoU, progress=False)
    # images 1, 2, 4, 5 hit (i % 3 != 0): recall 4/7, precision 4/4 (ignored-area detections dropped)
    assert result["num_images"] == 7
    assert result["recall"] == pytest.approx(4 / 7)
    assert result["precision"] == pytest.approx(1.0)
    assert result["hmean"] == pytest.approx(2 * (4 / 7) / (1 + 4 / 7))


def test_evaluate_keeps_predictions_of_chosen_images():
    """keep_predictions: exactly those dataset indices, each with the post-processor's own output."""
    loader = DataLoader(Boxes(), batch_size=3, collate_fn=collate)
    result = evaluate(lambda x: x[:, 0], loader, torch.device("cpu"), fake_pp, HmeanIoU, progress=False,
                      keep_predictions=[6, 0, 4])  # fmt: skip
    assert sorted(result["predictions"]) == [0, 4, 6]
    for i, (polygons, scores) in result["predictions"].items():
        want_polygons, want_scores = fake_pp(np.full((32, 32), float(i)), scale=(2.0, 2.0))
        assert len(polygons) == len(want_polygons) == (2 if i % 3 else 1) and scores == want_scores
        assert all(np.array_equal(a, b) for a, b in zip(polygons, want_polygons))
    plain = evaluate(lambda x: x[:, 0], loader, torch.device("cpu"), fake_pp, HmeanIoU, progress=False)
    assert "predictions" not in plain and plain["hmean"] == result["hmean"]


def test_padding_flags_mark_distributed_sampler_duplicates():
    data = Boxes()  # 7 images on 3 ranks: 9 slots, the last 2 are duplicates
    flags = {}
    for rank in range(3):
        sampler = DistributedSampler(data, num_replicas=3, rank=rank, shuffle=False)
        loader = DataLoader(data, sampler=sampler, batch_size=2, collate_fn=collate)
        flags[rank] = _padding_flags(loader, len(sampler))
        kept = [i for i, pad in zip(sampler, flags[rank]) if not pad]
        flags[rank] = kept
    assert sorted(flags[0] + flags[1] + flags[2]) == list(range(7))
    shuffled = DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=0, shuffle=True))
    with pytest.raises(ValueError, match="shuffle=False"):
        _padding_flags(shuffled, 4)

"""MMOCR's learning-rate schedules: every recipe, every optimiser step, against mmengine's semantics."""

import math

import numpy as np
import pytest

from dbnetpp.config import PRESETS, RECIPES, get_config
from dbnetpp.engine import learning_rates as engine_learning_rates
from dbnetpp.schedules import learning_rates, lr_at_step, schedule_length

ITERS_PER_EPOCH = {"icdar2015": 63, "totaltext": 79, "synthtext": 1}  # 1000/16, 1255/16 images per batch


class _ChainedScheduler:
    """mmengine's _ParamScheduler bookkeeping with LinearLR / PolyLR updates, written from its rules:
    ``step()`` bumps ``last_step`` and rewrites the LR from the *current* LR only while
    ``begin <= global_step < end``; the constructor calls ``step()`` once; ``total_iters = end - begin - 1``."""

    def __init__(self, kind, group, begin, end, **kw):
        self.kind, self.group, self.begin, self.end, self.kw = kind, group, begin, end, kw
        self.total = end - begin - 1
        self.last_step, self.global_step = -1, 0
        self.step()

    def step(self):
        if self.begin <= self.global_step < self.end:
            self.last_step += 1
            lr, k, n = self.group["lr"], self.last_step, self.total
            if self.kind == "linear":
                s = self.kw["start_factor"]
                lr = lr * s if k == 0 else lr * (1.0 + (1.0 - s) / (n * s + (k - 1) * (1.0 - s)))
            elif k > 0:  # poly; step 0 keeps the current value
                eta, p = self.kw["eta_min"], self.kw["power"]
                lr = (lr - eta) * (1.0 - 1.0 / (n - k + 1)) ** p + eta
            self.group["lr"] = lr
        self.global_step += 1


def chained_lrs(cfg, iters_per_epoch):
    """LR of every optimiser step, MMOCR style: schedulers stepped after each epoch (or iteration)."""
    t = cfg.train
    group = {"lr": t.lr}
    end = t.max_iters if t.max_iters is not None else t.epochs
    scheds = []
    if t.warmup:
        scheds.append(_ChainedScheduler("linear", group, 0, t.warmup, start_factor=t.warmup_factor))
    scheds.append(_ChainedScheduler("poly", group, t.warmup, end, eta_min=t.lr_min, power=t.lr_power))
    per_unit = []
    for _ in range(end):
        per_unit.append(group["lr"])
        for s in scheds:
            s.step()
    repeat = 1 if t.max_iters is not None else iters_per_epoch
    return np.repeat(np.array(per_unit), repeat)


def closed_form_lrs(cfg, iters_per_epoch):
    t = cfg.train
    end = t.max_iters if t.max_iters is not None else t.epochs
    u = np.arange(end, dtype=np.float64)
    if t.warmup:
        warm = t.lr * (t.warmup_factor + (1 - t.warmup_factor) * u / (t.warmup - 1))
    else:
        warm = np.zeros_like(u)
    poly = t.lr_min + (t.lr - t.lr_min) * np.clip(1 - (u - t.warmup) / (end - t.warmup - 1), 0, 1) ** t.lr_power
    per_unit = np.where(u < t.warmup, warm, poly)
    return np.repeat(per_unit, 1 if t.max_iters is not None else iters_per_epoch)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.abs(np.asarray(b))))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_step_matches_mmengine_rules(name):
    cfg = RECIPES[name]
    ipe = ITERS_PER_EPOCH[cfg.data.kind]
    n = schedule_length(cfg, ipe)
    got = np.array(learning_rates(cfg, ipe, n))
    assert len(got) == n == (100_000 if cfg.train.max_iters else 1200 * ipe)
    assert _rel(got, chained_lrs(cfg, ipe)) < 1e-6
    assert _rel(got, closed_form_lrs(cfg, ipe)) < 1e-9
    t = cfg.train
    # boundaries: first step, warm-up/poly handover, last step at eta_min, constant within an epoch
    assert math.isclose(got[0], t.lr * (t.warmup_factor if t.warmup else 1.0), rel_tol=1e-12)
    assert math.isclose(got[-1], t.lr_min, rel_tol=1e-9)
    unit = 1 if t.max_iters else ipe
    if t.warmup:
        last_warm, first_poly = got[(t.warmup - 1) * unit], got[t.warmup * unit]
        assert math.isclose(last_warm, t.lr, rel_tol=1e-12) and math.isclose(first_poly, t.lr, rel_tol=1e-12)
        assert got[t.warmup * unit - 1] == last_warm
        assert got[(t.warmup + 1) * unit] < t.lr
    if not t.max_iters:
        assert np.all(got.reshape(-1, ipe) == got.reshape(-1, ipe)[:, :1])


def test_dbnetpp_r50_warmup_values():
    """dbnetpp_resnet50_fpnc_1200e_icdar2015 by hand: LinearLR(0.001, end=200), PolyLR(begin=200, end=1200)."""
    cfg = get_config("dbnetpp_resnet50_fpnc_1200e_icdar2015")
    lr = lambda epoch: lr_at_step(cfg, epoch * 10 + 3, 10)  # noqa: E731
    assert math.isclose(lr(0), 3e-6, rel_tol=1e-12)
    assert math.isclose(lr(100), 0.003 * (0.001 + 0.999 * 100 / 199), rel_tol=1e-12)
    assert math.isclose(lr(700), 1e-7 + (0.003 - 1e-7) * (1 - 500 / 999) ** 0.9, rel_tol=1e-12)
    assert math.isclose(lr(1198), 1e-7 + (0.003 - 1e-7) * (1 / 999) ** 0.9, rel_tol=1e-12)
    assert lr(1199) == pytest.approx(1e-7, rel=1e-12)
    assert lr(5000) == pytest.approx(1e-7, rel=1e-12)  # past the end: stays at eta_min, as mmengine


def test_iteration_based_ignores_iters_per_epoch():
    cfg = RECIPES["dbnetpp_resnet50-dcnv2_fpnc_100k_synthtext"]
    steps = [0, 1, 9_999, 50_000, 99_998, 99_999]
    a = [lr_at_step(cfg, s, 1) for s in steps]
    assert a == [lr_at_step(cfg, s, 1234) for s in steps]
    assert a[0] == 0.007 and a[-1] == pytest.approx(1e-7, rel=1e-12)
    assert a[3] == pytest.approx(1e-7 + (0.007 - 1e-7) * (1 - 50_000 / 99_999) ** 0.9, rel=1e-12)


def test_presets_and_engine_export():
    assert engine_learning_rates is learning_rates
    for name in ("mmocr", "tiny"):
        cfg = PRESETS[name]
        got = learning_rates(cfg, 5, schedule_length(cfg, 5))
        assert _rel(got, chained_lrs(cfg, 5)) < 1e-6
    with pytest.raises(ValueError, match="iters_per_epoch"):
        lr_at_step(PRESETS["mmocr"], 0, 0)
    with pytest.raises(ValueError, match="step"):
        lr_at_step(PRESETS["mmocr"], -1, 10)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_against_mmengine_if_installed(name):
    scheduler = pytest.importorskip("mmengine.optim.scheduler", reason="mmengine not installed")
    torch = pytest.importorskip("torch")
    cfg = RECIPES[name]
    t = cfg.train
    by_epoch = t.max_iters is None
    end = t.epochs if by_epoch else t.max_iters
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr, momentum=t.momentum)
    scheds = []
    if t.warmup:
        scheds.append(scheduler.LinearLR(opt, start_factor=t.warmup_factor, end=t.warmup, by_epoch=by_epoch))
    scheds.append(scheduler.PolyLR(opt, power=t.lr_power, eta_min=t.lr_min, begin=t.warmup, end=end, by_epoch=by_epoch))
    ref = []
    for _ in range(end):
        ref.append(opt.param_groups[0]["lr"])
        for s in scheds:
            s.step()
    ipe = 1 if not by_epoch else 7
    ref = np.repeat(np.array(ref), ipe)
    assert _rel(learning_rates(cfg, ipe, len(ref)), ref) < 1e-6

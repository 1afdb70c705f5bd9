"""Learning-rate schedules of MMOCR's recipes, as pure functions of the optimiser step.

MMOCR chains mmengine schedulers: an optional ``LinearLR`` warm-up over ``[0, warmup)`` followed
by ``PolyLR`` over ``[warmup, end)``, stepped once per epoch (or once per iteration for the
iteration-based SynthText pretraining). mmengine sets ``total_iters = end - begin - 1`` for
both, so with t counted in schedule units (epochs or iterations):

- warm-up (t < warmup):  lr = base * (f + (1 - f) * t / (warmup - 1))
- poly (t >= warmup):    lr = eta_min + (base - eta_min) * (1 - (t - warmup) / (end - warmup - 1)) ** power

so the first poly unit runs at ``base`` and the last one (t = end - 1) at ``eta_min``. These are
the closed forms of mmengine's chained (multiplicative) updates: for all ten MMOCR recipes they
agree with mmengine 0.10.7's LinearLR/PolyLR, stepped as its ParamSchedulerHook steps them, to
2.4e-12 relative at every optimiser step (tests/test_schedules.py). Within an epoch-based schedule
every iteration of epoch e uses the value of e; past the end the LR stays at eta_min.

The training loop sets every optimiser step's learning rate from ``lr_at_step`` (times the
batch-size scaling factor), so what ``learning_rates`` returns is what training uses.
"""

from typing import List

from dbnetpp.config import Config

__all__ = ["lr_at_step", "learning_rates", "schedule_length"]


def schedule_length(cfg: Config, iters_per_epoch: int) -> int:
    """Number of optimiser steps of the whole run."""
    t = cfg.train
    return t.max_iters if t.max_iters is not None else t.epochs * iters_per_epoch


def lr_at_step(cfg: Config, step: int, iters_per_epoch: int) -> float:
    """Learning rate of 0-based optimiser step ``step`` for the recipe's base LR ``cfg.train.lr``.

    ``iters_per_epoch`` (>= 1) maps steps to epochs in epoch-based schedules and is unused when
    ``cfg.train.max_iters`` is set. Past the end the LR stays at ``lr_min``.
    """
    t = cfg.train
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if t.max_iters is not None:
        unit, end = step, t.max_iters
    else:
        unit, end = step // iters_per_epoch, t.epochs
    base, eta_min = t.lr, t.lr_min
    if unit < t.warmup:
        span = t.warmup - 1
        factor = 1.0 if span == 0 else t.warmup_factor + (1.0 - t.warmup_factor) * unit / span
        return base * factor
    span = end - t.warmup - 1
    if span <= 0:
        return base
    progress = min(unit - t.warmup, span) / span
    return eta_min + (base - eta_min) * (1.0 - progress) ** t.lr_power


def learning_rates(cfg: Config, iters_per_epoch: int, num_steps: int) -> List[float]:
    """The learning rate of each of the first ``num_steps`` optimiser steps (unscaled base LR)."""
    return [lr_at_step(cfg, s, iters_per_epoch) for s in range(num_steps)]

"""How far a compiled DBNet lands from eager, beside how far eager lands from eager.

"Compiled equals eager within 1e-4 for outputs and 1e-3 for every parameter gradient,
relative to each tensor's largest value" can hold only where float32 arithmetic done in
another order moves the same step less than that. Eager alone does that whenever a run changes
only the summation order. So for each model, implementation, mode and size, this script runs
one eager float32 step, the reference, and compares it with the same step run:

- ``float64``: in float64 (float32 rounding against exact arithmetic);
- ``1 thread``: eager with ``torch.set_num_threads(1)`` (the same kernels, other partial sums);
- ``channels_last``: eager with NHWC weights and input (the layout inductor gives every
  convolution on the CPU);
- ``impl <other>``: eager with the other deformable-convolution implementation;
- ``inductor``: ``torch.compile(model, fullgraph=True)`` and the compiled ``DBLoss`` (unless
  ``--no-inductor``): convolutions and train-mode BatchNorm as eager's kernels
  (``dbnetpp.ops.conv_bn``), the rest inductor's;
- ``inductor, own kernels``: the same with ``set_eager_kernels(False)``: inductor's channels-last
  convolutions and its decomposed BatchNorm.

A training step is forward, ``DBLoss`` and backward on random images and targets; an eval step
is the forward under ``no_grad``. Each comparison prints one JSON line with:

- ``outputs``: max |x - reference| / max |reference| per output (and loss term);
- for training steps:
  - ``grad_median``: the median of that ratio over the parameter gradients;
  - ``grads_over_1e-3`` and ``worst``: how many gradients exceed 1e-3, and the worst ones.

  Some gradients are 0 or nearly so. A bias right before a train-mode BatchNorm (the head's
  transposed convolutions) has an exact gradient of 0, and every run gives it exactly 0
  (``dbnetpp.models.head``); behind a saturated sigmoid (the ASF attention at MMOCR's
  initialisation) a gradient is nearly 0, and rounding noise dominates it. So each ratio is
  taken against at least 1e-4 x the largest gradient of the model, and ``below_floor`` names
  the gradients smaller than that.

The first line names the CPU and its ISA flags::

    python benchmarks/compile_numerics.py                        # both names, both impls, train
    python benchmarks/compile_numerics.py --modes train eval --sizes 64 128 --no-inductor
"""

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_check import random_db_targets  # noqa: E402  (benchmarks/, this script's folder)

from dbnetpp.cpuinfo import cpu_info  # noqa: E402
from dbnetpp.loss import DBLoss  # noqa: E402
from dbnetpp.models.dbnet import build_model, set_dcn_impl  # noqa: E402
from dbnetpp.models.dcn import ModulatedDeformConv2d  # noqa: E402
from dbnetpp.ops import conv_bn  # noqa: E402

NAMES = ("dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015", "dbnetpp_resnet18_dcnv2_tiny")
IMPLS = ("fast", "torchvision")
GRADIENT_FLOOR = 1e-4  # x the model's largest gradient: the smallest scale a gradient is compared at

Tensors = Dict[str, torch.Tensor]


def step(
    model: torch.nn.Module,
    mode: str,
    size: int,
    batch: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    backend: Optional[str] = None,
    eager_kernels: bool = True,
) -> Tuple[Tensors, Tensors]:
    """(outputs, parameter gradients) of one step of a copy of ``model`` on the seeded batch,
    everything in float64 for comparison; gradients empty in eval mode. ``eager_kernels``: see
    ``dbnetpp.ops.conv_bn.set_eager_kernels`` (compiled runs)."""
    conv_bn.set_eager_kernels(eager_kernels)
    try:
        return _step(model, mode, size, batch, seed, dtype, channels_last, backend)
    finally:
        conv_bn.set_eager_kernels(True)


def _step(model, mode, size, batch, seed, dtype, channels_last, backend) -> Tuple[Tensors, Tensors]:
    model = copy.deepcopy(model).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=gen).to(dtype)
    targets = {k: v.to(dtype) for k, v in random_db_targets(batch, size, gen).items()}
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    net, criterion = model, DBLoss()
    if backend is not None:
        net = torch.compile(model, fullgraph=True, backend=backend)
        criterion = torch.compile(criterion, fullgraph=True, backend=backend)
    if mode == "eval":
        with torch.no_grad():
            return {"prob": net(images).double()}, {}
    outputs = net(images)
    losses = criterion(outputs, targets)
    losses["loss"].backward()
    values = {k: v.detach().double() for k, v in {**outputs, **losses}.items()}
    grads = {k: p.grad.double() for k, p in model.named_parameters() if p.grad is not None}
    return values, grads


def relative_errors(got: Tensors, want: Tensors, floor: float = 0.0) -> Dict[str, float]:
    """max |got - want| / max(max |want|, floor) per tensor."""
    return {
        k: ((got[k] - w).abs().max() / max(w.abs().max().item(), floor, 1e-30)).item() for k, w in want.items()
    }


def compare(
    tag: str, got: Tuple[Tensors, Tensors], reference: Tuple[Tensors, Tensors], case: Dict[str, Any]
) -> Dict[str, Any]:
    (outputs, grads), (want_outputs, want_grads) = got, reference
    row: Dict[str, Any] = {**case, "against_eager_float32": tag}
    row["outputs"] = {k: float(f"{v:.2g}") for k, v in relative_errors(outputs, want_outputs).items()}
    if want_grads:
        largest = max(g.abs().max().item() for g in want_grads.values())
        floor = GRADIENT_FLOOR * largest
        errors = relative_errors(grads, want_grads, floor)
        ordered = sorted(errors.values())
        over = sorted(((v, k) for k, v in errors.items() if v > 1e-3), reverse=True)
        row["grad_median"] = float(f"{ordered[len(ordered) // 2]:.2g}")
        row["grads_over_1e-3"] = len(over)
        row["n_grads"] = len(errors)
        row["worst"] = [[k, float(f"{v:.2g}")] for v, k in over[:3]]
        row["below_floor"] = sorted(k for k, g in want_grads.items() if g.abs().max().item() < floor)
    return row


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", nargs="+", default=list(NAMES))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--modes", nargs="+", default=["train"], choices=("train", "eval"))
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="threads of every run but '1 thread'")
    parser.add_argument("--no-inductor", action="store_true", help="skip the compiled runs (minutes each)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    print(json.dumps({"cpu": cpu_info(), "torch": torch.__version__, "threads": args.threads}), flush=True)
    for name in args.names:
        torch.manual_seed(args.seed)
        base = build_model(name)
        has_dcn = any(isinstance(m, ModulatedDeformConv2d) for m in base.modules())
        for impl in args.impls if has_dcn else args.impls[:1]:
            for mode in args.modes:
                model = copy.deepcopy(base)
                set_dcn_impl(model, impl)
                model = model.train() if mode == "train" else model.eval()
                # (tag, model, step options, threads) of each run compared with the reference
                variants = [
                    ("float64", model, dict(dtype=torch.float64), args.threads),
                    ("1 thread", model, {}, 1),
                    ("channels_last", model, dict(channels_last=True), args.threads),
                ]
                if has_dcn:
                    other = next(i for i in IMPLS if i != impl)
                    twin = copy.deepcopy(model)
                    set_dcn_impl(twin, other)
                    variants.append((f"impl {other}", twin, {}, args.threads))
                if not args.no_inductor:
                    variants.append(("inductor", model, dict(backend="inductor"), args.threads))
                    own = dict(backend="inductor", eager_kernels=False)
                    variants.append(("inductor, own kernels", model, own, args.threads))
                for size in args.sizes:
                    case = {"name": name, "impl": impl, "mode": mode, "size": size, "batch": args.batch}
                    common = dict(mode=mode, size=size, batch=args.batch, seed=args.seed)
                    reference = step(model, **common)
                    for tag, net, options, threads in variants:
                        if options.get("backend"):
                            torch._dynamo.reset()  # a fresh compile per size
                        torch.set_num_threads(threads)
                        try:
                            got = step(net, **options, **common)
                        finally:
                            torch.set_num_threads(args.threads)
                        print(json.dumps(compare(tag, got, reference, case)), flush=True)


if __name__ == "__main__":
    main()

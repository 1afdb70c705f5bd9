"""Whole-graph ``torch.compile`` against eager on the CPU: compile seconds and speed.

Two workloads, each eager and compiled (``torch.compile(fullgraph=True)``, inductor by default):

- ``train``: a training step of the tiny preset (``dbnetpp_resnet18_dcnv2_tiny``, channels_last,
  Adam, batch 4 at 256x256 as ``examples/train.py --preset tiny``): forward, DBLoss, backward,
  optimiser step; the model and the loss compiled.
- ``infer``: the prepared DBNet++ R50-DCNv2 forward (``prepare_for_inference``) on 1x3x1024x1824.

The training step compiles twice: as shipped (convolutions and train-mode BatchNorm as eager's
kernels, ``dbnetpp.ops.conv_bn``) and ``"compiled, own kernels"`` (``set_eager_kernels(False)``:
inductor's channels-last convolutions and its own BatchNorm). ``compile_s`` is the first compiled
call minus an eager call (the compile itself); the timed calls go round the modes in turn. Prints
one JSON line per workload and mode, with the CPU name and its ISA flags::

    python benchmarks/compile.py                       # both workloads, inductor
    python benchmarks/compile.py --workloads train --repeats 5
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_check import random_db_targets  # noqa: E402  (benchmarks/, this script's folder)

from dbnetpp import allocator  # noqa: E402
from dbnetpp.cpuinfo import cpu_info  # noqa: E402
from dbnetpp.inference import prepare_for_inference  # noqa: E402
from dbnetpp.loss import DBLoss  # noqa: E402
from dbnetpp.models import build_model  # noqa: E402
from dbnetpp.ops import conv_bn  # noqa: E402


def train_step(compiled: bool, backend: str, batch: int, size: int) -> Callable[[], Any]:
    torch.manual_seed(0)
    model = build_model("dbnetpp_resnet18_dcnv2_tiny").train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.5e-3)
    net, criterion = model, DBLoss()
    if compiled:
        net = torch.compile(model, fullgraph=True, backend=backend)
        criterion = torch.compile(criterion, fullgraph=True, backend=backend)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    targets = random_db_targets(batch, size, torch.Generator().manual_seed(0))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(net(images), targets)["loss"].backward()
        optimizer.step()

    return step


def infer_step(compiled: bool, backend: str, height: int, width: int) -> Callable[[], Any]:
    torch.manual_seed(0)
    model = prepare_for_inference(build_model("dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015"))
    net = torch.compile(model, fullgraph=True, backend=backend) if compiled else model
    images = torch.randn(1, 3, height, width)

    def step() -> None:
        with torch.no_grad():
            net(images)

    return step


def measure(steps: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, Dict[str, float]]:
    """First call (the compile, for a compiled step) of each step, then ``repeats`` rounds calling
    each step once in turn, so the machine's drift over minutes hits every mode alike."""
    times: Dict[str, List[float]] = {mode: [] for mode in steps}
    first: Dict[str, float] = {}
    for rounds in range(repeats + 1):
        for mode, step in steps.items():
            conv_bn.set_eager_kernels(mode != "compiled, own kernels")  # the value the step was compiled with
            try:
                start = time.perf_counter()
                step()
                elapsed = time.perf_counter() - start
            finally:
                conv_bn.set_eager_kernels(True)
            if rounds == 0:
                first[mode] = elapsed
            else:
                times[mode].append(elapsed)
    return {mode: {"first_s": first[mode], "median_s": statistics.median(times[mode])} for mode in steps}


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    allocator.keep_freed_memory()  # as examples/train.py does on the CPU
    common = {"benchmark": "compile", "threads": args.threads, "torch": torch.__version__, **cpu_info()}
    for workload in args.workloads:
        modes = ("eager", "compiled", "compiled, own kernels") if workload == "train" else ("eager", "compiled")
        if workload == "train":
            steps = {mode: train_step(mode != "eager", args.backend, args.batch, args.size) for mode in modes}
            shape = [args.batch, 3, args.size, args.size]
        else:
            steps = {mode: infer_step(mode != "eager", args.backend, args.height, args.width) for mode in modes}
            shape = [1, 3, args.height, args.width]
        results = measure(steps, args.repeats)
        for mode in modes:
            record = {**common, "workload": workload, "mode": mode, "input": shape, **results[mode]}
            if mode != "eager":
                record.update(
                    backend=args.backend,
                    compile_s=results[mode]["first_s"] - results["eager"]["median_s"],
                    speedup=results["eager"]["median_s"] / results[mode]["median_s"],
                )
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}), flush=True)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="torch.compile against eager", add_help=add_help)
    parser.add_argument("--workloads", nargs="+", choices=("train", "infer"), default=["train", "infer"])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=4, help="train: images per step (the tiny preset's)")
    parser.add_argument("--size", type=int, default=256, help="train: square crop side (the tiny preset's)")
    parser.add_argument("--height", type=int, default=1024, help="infer: input height")
    parser.add_argument("--width", type=int, default=1824, help="infer: input width")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())

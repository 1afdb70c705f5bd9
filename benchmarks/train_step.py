"""Training-step speed of a DBNet (default DBNet++ R50-DCNv2) at 2x3x640x640.

One step = forward in train mode, ``DBLoss`` on random targets (or the sum of the output means
when ``dbnetpp.loss`` is unavailable), backward and an SGD step (lr 0.007, momentum 0.9,
weight decay 1e-4). malloc keeps freed memory (``dbnetpp.allocator``), as ``examples/train.py``
does on the CPU, unless ``--no-keep-memory``. Prints JSON lines: the median step time and
images/s over ``--repeats`` steps after ``--warmup`` steps::

    python benchmarks/train_step.py --impl fast --repeats 3
    python benchmarks/train_step.py --impl torchvision --repeats 3
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dbnetpp import allocator  # noqa: E402
from dbnetpp.models import build_model  # noqa: E402


def make_loss() -> Callable[[Dict[str, torch.Tensor], Dict[str, torch.Tensor]], torch.Tensor]:
    try:
        from dbnetpp.loss import DBLoss
    except ImportError:
        DBLoss = None
    if DBLoss is None:
        return lambda outputs, targets: sum(v.float().mean() for v in outputs.values())
    criterion = DBLoss()
    return lambda outputs, targets: criterion(outputs, targets)["loss"]


def random_targets(batch: int, size: int) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shrink = (torch.rand(batch, size, size, generator=gen) > 0.8).float()
    return {
        "shrink_map": shrink,
        "shrink_mask": torch.ones(batch, size, size),
        "thr_map": 0.3 + 0.4 * torch.rand(batch, size, size, generator=gen),
        "thr_mask": (torch.rand(batch, size, size, generator=gen) > 0.5).float(),
    }


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not args.no_keep_memory:
        allocator.keep_freed_memory()  # as examples/train.py does on the CPU
    model = build_model(args.model, dcn_impl=args.impl).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.007, momentum=0.9, weight_decay=1e-4)
    loss_fn = make_loss()
    images = torch.randn(args.batch, 3, args.size, args.size)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = random_targets(args.batch, args.size)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), targets)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.repeats)]
    seconds = statistics.median(times)
    common = dict(benchmark="train_step", model=args.model, impl=args.impl, batch=args.batch, size=args.size,
                  threads=args.threads, channels_last=args.channels_last,
                  malloc_keeps_freed_memory=allocator.is_keeping_freed_memory())
    print(json.dumps({**common, "metric": "step_s", "value": round(seconds, 3), "unit": "s"}), flush=True)
    print(json.dumps({**common, "metric": "throughput", "value": round(args.batch / seconds, 3), "unit": "images/s"}),
          flush=True)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="DBNet training-step timing", add_help=add_help)
    parser.add_argument("--model", default="dbnetpp_resnet50_dcnv2")
    parser.add_argument("--impl", default="auto", choices=["auto", "torchvision", "fast"], help="DCN implementation")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-keep-memory", action="store_true",
                        help="leave glibc malloc's defaults (training keeps freed memory on the CPU)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())

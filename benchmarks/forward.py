"""CPU forward latency of a DBNet / DBNet++ model (default: MMOCR's DBNet++ R50-DCNv2).

The input is 1x3x1024x1824, the padded ICDAR 2015 test size (1280x720 resized to 1820x1024).
Weights are random; each DCN's offset predictor gets random weights scaled to offsets of about
a pixel, as in a trained model (a zero predictor would sample on the integer grid only).

    python benchmarks/forward.py [--model dbnetpp_resnet50_dcnv2] [--height 1024 --width 1824]
                                 [--repeats 3] [--threads 2] [--impl auto]

Prints one JSON line per figure: the median over ``--repeats`` timed runs (after one warm-up)
under ``torch.inference_mode``, for the plain eval model ("eager") and, when
``dbnetpp.inference.prepare_for_inference`` exists, for the prepared model, which is the path
``dbnetpp.Detector`` uses by default.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dbnetpp.models.dbnet import MODEL_NAMES, build_model, set_dcn_impl  # noqa: E402
from dbnetpp.models.dcn import ModulatedDeformConv2d  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=add_help)
    parser.add_argument("--model", default="dbnetpp_resnet50_dcnv2", choices=MODEL_NAMES)
    parser.add_argument("--height", type=int, default=1024, help="input height, pixels (multiple of 32)")
    parser.add_argument("--width", type=int, default=1824, help="input width, pixels (multiple of 32)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--impl", default="auto", help="deformable-conv implementation of the DCN layers")
    parser.add_argument("--no-prepared", action="store_true", help="skip the prepare_for_inference model")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def randomize_offsets(model: nn.Module, height: int = 128, width: int = 128) -> None:
    """Random DCN offset predictors scaled (on a small random input) to give offsets of about
    a pixel (std 1) and mask logits of std 1, as a trained model has."""
    dcns = [m for m in model.modules() if isinstance(m, ModulatedDeformConv2d)]
    for m in dcns:
        nn.init.normal_(m.conv_offset.weight)
        nn.init.zeros_(m.conv_offset.bias)
    # earlier layers' offsets change later inputs: calibrate one layer at a time
    for m in dcns:
        seen = []
        handle = m.conv_offset.register_forward_hook(lambda mod, inp, out: seen.append(out.std().item()))
        with torch.inference_mode():
            model(torch.randn(1, 3, height, width))
        handle.remove()
        with torch.no_grad():
            m.conv_offset.weight.div_(max(seen[0], 1e-12))


def time_forward(fn: Callable[[], torch.Tensor], repeats: int, warmup: int) -> List[float]:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return times


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args.model).eval()
    randomize_offsets(model)
    num_dcn = set_dcn_impl(model, args.impl)
    x = torch.randn(args.batch, 3, args.height, args.width)

    try:
        from dbnetpp.inference import prepare_for_inference
    except ImportError:
        prepare_for_inference = None

    paths = [("eager", model)]
    if prepare_for_inference is not None and not args.no_prepared:
        paths.append(("prepared", prepare_for_inference(model)))
    default_path = "prepared" if prepare_for_inference is not None else "eager"

    for path, net in paths:
        times = time_forward(lambda: net(x), args.repeats, args.warmup)
        record = {
            "benchmark": "forward",
            "metric": "latency_median",
            "value": round(statistics.median(times), 4),
            "unit": "s",
            "model": args.model,
            "path": path,
            "default_path": path == default_path,
            "input": [args.batch, 3, args.height, args.width],
            "threads": args.threads,
            "dcn_impl": args.impl if num_dcn else None,
            "runs_s": [round(t, 4) for t in times],
            "device": "cpu",
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())

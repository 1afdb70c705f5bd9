"""CPU forward latency of a DBNet / DBNet++ model (default: MMOCR's DBNet++ R50-DCNv2).

The input is 1x3x1024x1824, the padded ICDAR 2015 test size (1280x720 resized to 1820x1024).
Weights are random; each DCN's offset predictor gets random weights scaled to offsets of about
a pixel, as in a trained model (a zero predictor would sample on the integer grid only).

    python benchmarks/forward.py [--model dbnetpp_resnet50_dcnv2] [--height 1024 --width 1824]
                                 [--repeats 3] [--threads 2] [--impl auto] [--precision int8 --precision bf16]
                                 [--no-eager]

Prints one JSON line per figure: the median over ``--repeats`` timed runs (after one warm-up)
under ``torch.inference_mode``, for the plain eval model ("eager", timed first, with glibc's
default malloc) and for the model of ``dbnetpp.inference.prepare_for_inference`` ("prepared",
the path ``dbnetpp.Detector`` uses; it also makes malloc keep freed memory, see
``dbnetpp.allocator``, unless ``--no-keep-memory``). With ``--breakdown`` it then prints where
the prepared forward's time goes: one line per part (stem, layer1..4, the 13 DCNs inside them,
neck and its ASF conv / attention, head), median ms over the same number of runs.

``--precision int8`` / ``--precision bf16`` add the prepared model at that precision (``dbnetpp.quantize``,
as ``Detector(..., precision=...)`` runs it) in the same run, after fp32; every line carries the CPU
model and its ISA extensions (avx2, avx512_vnni, avx512_bf16, amx), which decide these figures.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dbnetpp import allocator  # noqa: E402
from dbnetpp.cpuinfo import cpu_info  # noqa: E402
from dbnetpp.inference import prepare_for_inference  # noqa: E402
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
    parser.add_argument("--no-eager", action="store_true", help="skip the plain eval model (the slowest figure)")
    parser.add_argument("--no-keep-memory", action="store_true", help="prepare with keep_memory=False")
    parser.add_argument("--breakdown", action="store_true", help="time the parts of the prepared forward")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision",
        action="append",
        choices=("fp32", "bf16", "int8"),
        default=None,
        help="also time the prepared model at this precision, side by side with fp32 (repeatable); int8 is "
        "calibrated on --calibration-images built-in synthetic images at the input size",
    )
    parser.add_argument("--calibration-images", type=int, default=2, help="int8 calibration images (default 2)")
    return parser


def lower_precision_model(prepared: nn.Module, precision: str, x: torch.Tensor, count: int) -> nn.Module:
    """``prepared`` at bf16 / int8 as ``dbnetpp.Detector`` runs it (``dbnetpp.quantize.lower_precision``;
    int8 calibrated on ``count`` built-in synthetic images resized to the input size)."""
    from dbnetpp import quantize
    from dbnetpp.detector import Detector

    height, width = x.shape[2:]
    detector = Detector(prepared, test_scale=(max(height, width), min(height, width)), prepare=False)
    if precision == "bf16":
        quantize.require_native_bf16()
        return quantize.lower_precision(detector, precision)
    start = time.perf_counter()
    model = quantize.lower_precision(detector, precision, quantize.calibration_images(None, count))
    seconds = round(time.perf_counter() - start, 1)
    record = {"benchmark": "forward", "metric": "quantize_time", "value": seconds, "unit": "s", "images": count}
    print(json.dumps(record), flush=True)
    return model


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


def time_forward(
    fn: Callable[[], torch.Tensor], repeats: int, warmup: int, cpu_times: Optional[List[float]] = None
) -> List[float]:
    """Wall times (s) of ``repeats`` calls after ``warmup``; the process CPU times go to ``cpu_times``."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            times.append(time.perf_counter() - start)
            if cpu_times is not None:
                cpu_times.append(time.process_time() - cpu_start)
    return times


def parts_of(net: nn.Module) -> List[Tuple[str, List[nn.Module]]]:
    """(label, modules) whose forward times are summed into one figure."""
    backbone, neck = net.backbone, net.neck
    parts = [(f"backbone.layer{i}", [getattr(backbone, f"layer{i}")]) for i in range(1, 5)]
    parts += [
        ("backbone", [backbone]),
        ("backbone.dcn (13 layers, offsets included)",
         [m for m in backbone.modules() if isinstance(m, ModulatedDeformConv2d)]),
        ("neck", [neck]),
        ("det_head.binarize", [net.det_head.binarize]),  # predict() = sigmoid(binarize(x))
    ]
    if getattr(neck, "asf", False):
        fused = neck.asf_split if getattr(neck, "asf_split", None) is not None else neck.asf_conv
        parts += [("neck.asf_conv", [fused]), ("neck.asf_attn", [neck.asf_attn])]
    return parts


def time_parts(net: nn.Module, x: torch.Tensor, repeats: int) -> Dict[str, List[float]]:
    """Per-part wall time (s) of each of ``repeats`` forwards, from forward pre-hooks and hooks."""
    parts = parts_of(net)
    totals: Dict[str, List[float]] = {label: [] for label, _ in parts}
    totals["total"] = []
    current: Dict[str, float] = {}
    handles = []
    for label, modules in parts:
        for m in modules:
            def pre(mod, inp, label=label):
                current[label + "@start"] = time.perf_counter()

            def post(mod, inp, out, label=label):
                current[label] = current.get(label, 0.0) + time.perf_counter() - current[label + "@start"]

            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.inference_mode():
            net(x)
            for _ in range(repeats):
                current.clear()
                start = time.perf_counter()
                net(x)
                totals["total"].append(time.perf_counter() - start)
                for label, _ in parts:
                    totals[label].append(current.get(label, 0.0))
    finally:
        for h in handles:
            h.remove()
    layers = [sum(totals[f"backbone.layer{i}"][r] for i in range(1, 5)) for r in range(repeats)]
    totals["backbone.stem"] = [whole - stages for whole, stages in zip(totals["backbone"], layers)]
    return totals


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args.model).eval()
    randomize_offsets(model)
    num_dcn = set_dcn_impl(model, args.impl)
    x = torch.randn(args.batch, 3, args.height, args.width)
    common = {
        "model": args.model,
        "input": [args.batch, 3, args.height, args.width],
        "threads": args.threads,
        "dcn_impl": args.impl if num_dcn else None,
        "device": "cpu",
        **cpu_info(),
    }

    def report(path: str, net: nn.Module) -> None:
        cpu_times: List[float] = []
        times = time_forward(lambda: net(x), args.repeats, args.warmup, cpu_times)
        record = {
            "benchmark": "forward",
            "metric": "latency_median",
            "value": round(statistics.median(times), 4),
            "unit": "s",
            "path": path,
            "default_path": path == "prepared",
            "malloc_keeps_freed_memory": allocator.is_keeping_freed_memory(),
            **common,
            "runs_s": [round(t, 4) for t in times],
            # process CPU time of all threads: less sensitive than wall time to other jobs on the machine
            "cpu_s_median": round(statistics.median(cpu_times), 4),
        }
        print(json.dumps(record), flush=True)

    if not args.no_eager:
        report("eager", model)  # before prepare_for_inference changes malloc's settings
    if args.no_prepared:
        return
    prepared = prepare_for_inference(model, keep_memory=not args.no_keep_memory)
    report("prepared", prepared)
    for precision in args.precision or []:
        if precision == "fp32":
            continue
        report(f"prepared_{precision}", lower_precision_model(prepared, precision, x, args.calibration_images))
    if args.breakdown:
        for label, values in time_parts(prepared, x, args.repeats).items():
            record = {
                "benchmark": "forward",
                "metric": "part_ms_median",
                "part": label,
                "value": round(1000 * statistics.median(values), 1),
                "unit": "ms",
                "path": "prepared",
                **common,
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())

"""Deformable-convolution speed: the 13 DCNv2 layers of DBNet++ R50-DCNv2.

For every distinct layer shape (layer2/3/4, first block with stride 2, the others stride 1;
3x3, padding 1, deform_groups 1) it times ``modulated_deform_conv2d`` with each implementation
and, as the floor, the plain convolution of the same shape:

- ``forward``: inference (``torch.inference_mode``) at the test input 1x3x1024x1824;
- ``train``: forward + backward (gradients of input, weight, offset and mask) at the training
  input 2x3x640x640;
- ``model`` (opt-in, minutes): the whole R50-DCNv2 forward at 1x3x1024x1824, plain eval model
  with each DCN implementation and ``prepare_for_inference`` with channels_last off and on.

Offsets are random with a spread of a few pixels, masks random in (0, 1). Prints one JSON line
per layer, implementation and mode (median of ``--repeats`` runs, and their minimum, in ms), then the
totals over the 13 layers and the largest |fast - torchvision| difference seen::

    python benchmarks/dcn.py --repeats 3
    python benchmarks/dcn.py --modes forward --impls fast conv --channels-last
    python benchmarks/dcn.py --modes model --impls torchvision fast --repeats 2
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dbnetpp.ops.deform_conv import modulated_deform_conv2d  # noqa: E402

# (stage, planes, blocks) of ResNet-50 stages with DCN; stage s has input stride 2**(s+1)
STAGES = ((2, 128, 4), (3, 256, 6), (4, 512, 3))


def dcn_layers(height: int, width: int) -> List[Tuple[str, int, int, int, int, int]]:
    """Distinct DCN layers for an (height, width) image: (name, count, channels, H_in, W_in, stride)."""
    layers = []
    for stage, planes, blocks in STAGES:
        # output size of the stage (stride 2**(stage+1)), input of the strided first block at twice that
        h_out = -(-height // 2 ** (stage + 1))
        w_out = -(-width // 2 ** (stage + 1))
        layers.append((f"layer{stage}.0", 1, planes, 2 * h_out, 2 * w_out, 2))
        layers.append((f"layer{stage}.1-{blocks - 1}", blocks - 1, planes, h_out, w_out, 1))
    return layers


def timed(fn: Callable[[], object], repeats: int) -> Tuple[float, float]:
    """Median and minimum wall time of ``fn`` in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times), 1000 * min(times)


def make_inputs(batch: int, channels: int, height: int, width: int, stride: int, channels_last: bool, grad: bool):
    gen = torch.Generator().manual_seed(0)
    ho, wo = (height - 1) // stride + 1, (width - 1) // stride + 1
    x = torch.randn(batch, channels, height, width, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, channels, 3, 3, generator=gen) / (3 * channels**0.5)
    offset = 2.0 * torch.randn(batch, 18, ho, wo, generator=gen)
    mask = torch.rand(batch, 9, ho, wo, generator=gen)
    return [t.requires_grad_(grad) for t in (x, offset, mask, weight)]


def run_layer(impl: str, inputs: List[torch.Tensor], stride: int) -> torch.Tensor:
    x, offset, mask, weight = inputs
    if impl == "conv":
        return F.conv2d(x, weight, None, stride, 1)
    return modulated_deform_conv2d(x, offset, mask, weight, None, (stride, stride), (1, 1), (1, 1), impl=impl)


def emit(**record: object) -> None:
    print(json.dumps(record), flush=True)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    common = dict(benchmark="dcn", threads=args.threads, channels_last=args.channels_last)
    shapes = {"forward": (1, 1024, 1824), "train": (2, 640, 640)}
    for mode in args.modes:
        if mode == "model":
            run_model(args)
            continue
        batch, height, width = shapes[mode]
        totals: Dict[str, float] = {impl: 0.0 for impl in args.impls}
        max_diff = 0.0
        for name, count, channels, h_in, w_in, stride in dcn_layers(height, width):
            inputs = make_inputs(batch, channels, h_in, w_in, stride, args.channels_last, grad=mode == "train")
            outputs = {}
            for impl in args.impls:
                if mode == "forward":

                    def step(impl=impl):
                        with torch.inference_mode():
                            return run_layer(impl, inputs, stride)

                else:

                    def step(impl=impl):
                        for t in inputs:
                            t.grad = None
                        out = run_layer(impl, inputs, stride)
                        out.backward(torch.ones_like(out))
                        return out

                ms, best = timed(step, args.repeats)
                totals[impl] += count * ms
                emit(
                    **common,
                    metric=f"{mode}_ms",
                    layer=name,
                    layers=count,
                    impl=impl,
                    value=round(ms, 2),
                    unit="ms",
                    min=round(best, 2),
                    input=[batch, channels, h_in, w_in],
                    stride=stride,
                )
                if impl in ("fast", "torchvision"):
                    with torch.no_grad():
                        outputs[impl] = run_layer(impl, inputs, stride)
            if len(outputs) == 2:
                max_diff = max(max_diff, (outputs["fast"] - outputs["torchvision"]).abs().max().item())
        for impl, total in totals.items():
            emit(**common, metric=f"{mode}_total_ms", impl=impl, layers=13, value=round(total, 1), unit="ms",
                 image=[batch, 3, height, width])
        if "fast" in args.impls and "torchvision" in args.impls:
            emit(**common, metric=f"{mode}_max_abs_diff", impl="fast", value=max_diff, unit="1")


def run_model(args: argparse.Namespace) -> None:
    """Whole DBNet++ R50-DCNv2 forward at 1x3x1024x1824: plain eval model (each DCN implementation)
    and ``prepare_for_inference`` with channels_last off and on."""
    import copy

    from dbnetpp.inference import prepare_for_inference
    from dbnetpp.models import build_model, set_dcn_impl

    torch.manual_seed(0)
    model = build_model("dbnetpp_resnet50_dcnv2").eval()
    variants = {}
    for impl in args.impls:
        if impl != "conv":
            net = copy.deepcopy(model)
            set_dcn_impl(net, impl)
            variants[f"eval_{impl}"] = net
    variants["prepared_nchw"] = prepare_for_inference(model, channels_last=False)
    variants["prepared_channels_last"] = prepare_for_inference(model, channels_last=True)
    x = torch.randn(1, 3, 1024, 1824)
    for name, net in variants.items():
        with torch.inference_mode():
            ms, best = timed(lambda: net(x), args.repeats)
        emit(benchmark="dcn", threads=args.threads, metric="model_forward_s", variant=name, value=round(ms / 1000, 3),
             unit="s", min=round(best / 1000, 3), image=[1, 3, 1024, 1824])


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="DBNet++ DCN layer timings", add_help=add_help)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--impls", nargs="+", default=["torchvision", "fast", "conv"],
                        choices=["torchvision", "fast", "conv"])
    parser.add_argument("--modes", nargs="+", default=["forward", "train"], choices=["forward", "train", "model"],
                        help="model: the whole R50-DCNv2 forward, plain and prepared (slow: minutes)")
    parser.add_argument("--channels-last", action="store_true", help="input in channels_last memory format")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())

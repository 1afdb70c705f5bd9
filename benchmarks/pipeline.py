"""Training-data throughput of one process, as inside one DataLoader worker.

Times ``TrainDataset`` (MMOCR's DBNet++ train pipeline, DB targets and normalisation; the
full training sample) with cv2 threads 0 and torch threads 1:

- on ``SyntheticText`` images, generated (and cached) up front so only the pipeline is timed;
- on ICDAR 2015 images when ``--icdar-root`` is given (image decoding included, as MMOCR's
  figure of 19-20 samples/s includes it); the training split by default.

For each source it prints the rate of the default fused rendering and of the step-by-step
reference rendering (MMOCR's image path), then the split of one sample's time into transform,
targets and normalisation, and finally ``SyntheticText`` generation time per image. One JSON
line per figure, the median over ``--repeats`` passes over ``--samples`` samples::

    python benchmarks/pipeline.py --repeats 3
    python benchmarks/pipeline.py --icdar-root data/icdar2015 --samples 100
    python benchmarks/pipeline.py --quick
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dbnetpp.data import ICDAR2015, SyntheticText, TrainDataset, db_targets, train_transform  # noqa: E402
from dbnetpp.preprocess import normalize_image  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=add_help)
    parser.add_argument("--size", type=int, default=640, help="training input side, pixels")
    parser.add_argument("--samples", type=int, default=48, help="samples per timed pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (median reported)")
    parser.add_argument("--synthetic-size", type=int, nargs=2, default=(720, 1280), metavar=("H", "W"),
                        help="SyntheticText image size (default: ICDAR's 720 x 1280)")
    parser.add_argument("--icdar-root", default=None, help="ICDAR 2015 root (official or MMOCR layout)")
    parser.add_argument("--icdar-split", default="train", choices=("train", "test"))
    parser.add_argument("--no-reference", action="store_true", help="skip the step-by-step rendering")
    parser.add_argument("--quick", action="store_true", help="8 samples, 1 pass: a smoke test")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def median_ms(fn: Callable[[], None], count: int, repeats: int) -> Tuple[float, float]:
    """Median over ``repeats`` passes of ``fn`` doing ``count`` items: (wall, process CPU) ms per item.

    On a quiet machine the two agree; on a busy one the CPU time is the steadier figure.
    """
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - start) / count)
        cpu.append((time.process_time() - start_cpu) / count)
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def time_source(name: str, source: Any, args: argparse.Namespace, extra: Dict[str, Any]) -> None:
    count = min(args.samples, len(source))
    renders = ("fused",) if args.no_reference else ("fused", "reference")
    for render in renders:
        dataset = TrainDataset(source, size=args.size, seed=args.seed, fused=render == "fused")
        dataset[0]  # warm-up (imports, caches)
        ms, cpu_ms = median_ms(lambda: [dataset[i] for i in range(count)], count, args.repeats)
        emit(benchmark="pipeline", metric="samples_per_s", value=round(1000 / ms, 2), unit="samples/s",
             ms_per_sample=round(ms, 2), cpu_ms_per_sample=round(cpu_ms, 2), source=name, render=render,
             size=args.size, samples=count, repeats=args.repeats, **extra)

    # Where one sample's time goes (fused rendering; redraws skipped, rare).
    samples = [source[i] for i in range(count)]
    outs = []

    def transform() -> None:
        outs.clear()
        for i, s in enumerate(samples):
            rng = np.random.default_rng([args.seed, 0, i])
            outs.append(train_transform(s["image"], s["polygons"], s["ignore"], rng, args.size))

    parts = {"transform": median_ms(transform, count, args.repeats)}
    kept = [o for o in outs if o is not None]
    parts["targets"] = median_ms(
        lambda: [db_targets(o.polygons, o.ignore, args.size, args.size) for o in kept], len(kept), args.repeats)
    parts["normalize"] = median_ms(lambda: [normalize_image(o.image) for o in kept], len(kept), args.repeats)
    for part, (ms, cpu_ms) in parts.items():
        emit(benchmark="pipeline", metric=f"{part}_ms", value=round(ms, 2), unit="ms/sample",
             cpu_ms=round(cpu_ms, 2), source=name, size=args.size, samples=count, repeats=args.repeats, **extra)


def main(args: argparse.Namespace) -> None:
    if args.quick:
        args.samples, args.repeats = 8, 1
    cv2.setNumThreads(0)
    torch.set_num_threads(1)
    height, width = args.synthetic_size

    synthetic = SyntheticText(args.samples, (height, width), seed=args.seed, cache=True)
    generation = median_ms(lambda: [synthetic[i] for i in range(len(synthetic))], len(synthetic), 1)  # fills the cache
    time_source("synthetic", synthetic, args, {"image_size": [height, width]})
    square = SyntheticText(len(synthetic), 640, seed=args.seed)
    square_generation = median_ms(lambda: [square.generate(i) for i in range(len(square))], len(square), 1)
    for (ms, cpu_ms), shape in ((generation, [height, width]), (square_generation, [640, 640])):
        emit(benchmark="synthetic", metric="generation_ms_per_image", value=round(ms, 2), unit="ms/image",
             cpu_ms=round(cpu_ms, 2), image_size=shape, images=len(synthetic))

    if args.icdar_root:
        icdar = ICDAR2015(args.icdar_root, args.icdar_split)
        time_source(f"icdar2015_{args.icdar_split}", icdar, args, {"decode": True})


if __name__ == "__main__":
    main(get_args_parser().parse_args())

"""Speed of DB target generation (shrink map/mask, threshold map/mask) on real annotations.

Every ICDAR 2015 training annotation (1,000 images; ``###`` boxes included) is scaled by
0.5 onto a 640x360 canvas, as in PERF_NOTES' MMOCR figure (2.63 ms/image on the reference
2-core machine), and ``dbnetpp.data.targets.db_targets`` builds its four maps.

    python benchmarks/targets.py --root /path/to/icdar2015 [--repeats 3] [--limit N] [--baseline]

The root (holding ``ch4_training_localization_transcription_gt/``; no images needed) comes
from ``--root`` or ``DBNETPP_ICDAR2015_ROOT``. Prints one JSON line per figure: mean ms per
image and maps per second of the fastest of ``--repeats`` passes. ``--baseline`` also times
a straightforward transcription of MMOCR 1.0.1's DBModuleLoss target code on the same input
and reports whether every map is bit-identical.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import cv2
import numpy as np
import pyclipper
from shapely.geometry import Polygon

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dbnetpp.data.icdar2015 import ICDAR2015  # noqa: E402
from dbnetpp.data.targets import db_targets  # noqa: E402

HEIGHT, WIDTH, SCALE = 360, 640, 0.5


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=add_help)
    parser.add_argument("--root", default=os.environ.get("DBNETPP_ICDAR2015_ROOT"), help="ICDAR 2015 folder")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the annotations (fastest reported)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images (quick check)")
    parser.add_argument("--baseline", action="store_true", help="also time MMOCR's procedure and compare the maps")
    return parser


# ---------------------------------------------------------------------------------------------
# Baseline: MMOCR 1.0.1's procedure written out plainly (one polygon, one edge at a time).


def _mmocr_offset(poly: np.ndarray, distance: float) -> np.ndarray:
    pco = pyclipper.PyclipperOffset()
    pco.AddPath(np.array(poly).reshape(-1, 2), pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    paths = np.array(pco.Execute(distance), dtype=object)
    if len(paths) > 0 and isinstance(paths[0], list):  # split into parts of different sizes
        paths = np.array([])
    paths = paths.astype(np.float32)
    return paths if len(paths) == 0 else paths[0].flatten()


def _mmocr_edge_distance(xs: np.ndarray, ys: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    a2 = np.square(xs - p1[0]) + np.square(ys - p1[1])
    b2 = np.square(xs - p2[0]) + np.square(ys - p2[1])
    c2 = np.square(p1[0] - p2[0]) + np.square(p1[1] - p2[1])
    neg_cos = (c2 - a2 - b2) / (np.finfo(np.float32).eps + 2 * np.sqrt(a2 * b2))
    sin2 = np.nan_to_num(1 - np.square(neg_cos))
    out = np.sqrt(a2 * b2 * sin2 / (np.finfo(np.float32).eps + c2))
    out[neg_cos < 0] = np.sqrt(np.fmin(a2, b2))[neg_cos < 0]
    return out


def _mmocr_border(polygon: np.ndarray, canvas: np.ndarray, mask: np.ndarray, shrink_ratio: float) -> None:
    polygon = polygon.reshape(-1, 2)
    shape = Polygon(polygon)
    distance = shape.area * (1 - np.power(shrink_ratio, 2)) / shape.length
    grown = _mmocr_offset(polygon, distance)
    grown = polygon.copy().astype(np.int32) if len(grown) == 0 else grown.reshape(-1, 2).astype(np.int32)
    x_min, x_max = grown[:, 0].min(), grown[:, 0].max()
    y_min, y_max = grown[:, 1].min(), grown[:, 1].max()
    width, height = x_max - x_min + 1, y_max - y_min + 1
    polygon[:, 0] = polygon[:, 0] - x_min
    polygon[:, 1] = polygon[:, 1] - y_min
    xs = np.broadcast_to(np.linspace(0, width - 1, num=width).reshape(1, width), (height, width))
    ys = np.broadcast_to(np.linspace(0, height - 1, num=height).reshape(height, 1), (height, width))
    dist = np.zeros((polygon.shape[0], height, width), dtype=np.float32)
    for i in range(polygon.shape[0]):
        j = (i + 1) % polygon.shape[0]
        dist[i] = np.clip(_mmocr_edge_distance(xs, ys, polygon[i], polygon[j]) / distance, 0, 1)
    dist = dist.min(axis=0)
    x0, x1 = min(max(0, x_min), canvas.shape[1] - 1), min(max(0, x_max), canvas.shape[1] - 1)
    y0, y1 = min(max(0, y_min), canvas.shape[0] - 1), min(max(0, y_max), canvas.shape[0] - 1)
    if x0 - x_min >= width or y0 - y_min >= height:
        return
    cv2.fillPoly(mask, [grown.astype(np.int32)], 1.0)
    canvas[y0 : y1 + 1, x0 : x1 + 1] = np.fmax(
        1 - dist[y0 - y_min : y1 - y_max + height, x0 - x_min : x1 - x_max + width], canvas[y0 : y1 + 1, x0 : x1 + 1]
    )


def mmocr_targets(
    polygons: Sequence[np.ndarray], ignore: np.ndarray, height: int, width: int, shrink_ratio: float = 0.4
) -> Dict[str, np.ndarray]:
    """MMOCR's ``DBModuleLoss._get_target_single`` for one image (defaults), as float32 maps."""
    polygons = [np.array(p, dtype=np.float32).reshape(-1, 2) for p in polygons]
    ignore = np.array(ignore, dtype=bool)
    for i, poly in enumerate(polygons):
        if abs(Polygon(poly).area) < 1 or min(cv2.minAreaRect(poly)[1]) < 8:
            ignore[i] = True
    kernel = np.zeros((height, width), dtype=np.float32)
    for i, poly in enumerate(polygons):
        if ignore[i]:
            continue
        poly = poly.astype(np.int32)
        shape = Polygon(poly)
        d = int(shape.area * (1 - shrink_ratio * shrink_ratio) / (shape.length + 0.001) + 0.5)
        shrunk = _mmocr_offset(poly, -d)
        if len(shrunk) == 0:
            ignore[i] = True
            continue
        cv2.fillPoly(kernel, [shrunk.reshape(-1, 2).astype(np.int32)], i + 1)
    mask = np.ones((height, width), dtype=np.uint8)
    for poly in (p for p, ign in zip(polygons, ignore) if ign):
        cv2.fillPoly(mask, poly.astype(np.int32).reshape(1, -1, 2), 0)
    canvas = np.zeros((height, width), dtype=np.float32)
    thr_mask = np.zeros((height, width), dtype=np.uint8)
    with np.errstate(invalid="ignore"):
        for poly in (p for p, ign in zip(polygons, ignore) if not ign):
            _mmocr_border(poly, canvas, thr_mask, shrink_ratio)
    thr_map = canvas * (0.7 - 0.3) + 0.3
    return {
        "shrink_map": (kernel > 0).astype(np.float32),
        "shrink_mask": mask.astype(np.float32),
        "thr_map": thr_map.astype(np.float32),
        "thr_mask": thr_mask.astype(np.float32),
    }


# ---------------------------------------------------------------------------------------------


def load_inputs(root: str, limit: int = None) -> List[Tuple[List[np.ndarray], np.ndarray]]:
    dataset = ICDAR2015(root, "train", require_images=False)
    annotations = dataset.annotations[:limit]
    return [([p * np.float32(SCALE) for p in ann["polygons"]], ann["ignore"]) for ann in annotations]


def time_passes(fn: Callable, inputs: List, repeats: int) -> List[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for polygons, ignore in inputs:
            fn(polygons, ignore, HEIGHT, WIDTH)
        times.append((time.perf_counter() - start) / len(inputs))
    return times


def main(args: argparse.Namespace) -> None:
    if not args.root:
        sys.exit("no data: pass --root or set DBNETPP_ICDAR2015_ROOT")
    inputs = load_inputs(args.root, args.limit)
    boxes = sum(len(p) for p, _ in inputs)
    impls = [("dbnetpp", db_targets)]
    identical = None
    if args.baseline:
        impls.append(("mmocr_transcription", mmocr_targets))
        identical = all(
            all(np.array_equal(ours[k], ref[k]) and ours[k].dtype == ref[k].dtype for k in ref)
            for ours, ref in ((db_targets(p, i, HEIGHT, WIDTH), mmocr_targets(p, i, HEIGHT, WIDTH)) for p, i in inputs)
        )
    common = {"images": len(inputs), "boxes": boxes, "canvas_hw": [HEIGHT, WIDTH], "scale": SCALE}
    for name, fn in impls:
        fn(*inputs[0], HEIGHT, WIDTH)  # warm-up
        times = time_passes(fn, inputs, args.repeats)
        best = min(times)
        extra = {"impl": name, **common, "runs_ms": [round(t * 1e3, 4) for t in times]}
        if identical is not None:
            extra["identical_maps"] = identical
        print(json.dumps({"benchmark": "targets", "metric": "ms_per_image", "value": round(best * 1e3, 4),
                          "unit": "ms", **extra}), flush=True)
        print(json.dumps({"benchmark": "targets", "metric": "images_per_s", "value": round(1 / best, 1),
                          "unit": "images/s", **extra}), flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())

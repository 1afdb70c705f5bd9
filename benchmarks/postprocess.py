"""Speed of DB post-processing on 1024x1824 probability maps.

The maps resemble what DBNet++ produces on ICDAR 2015 test images at the test
resize (1280x720 -> 1820x1024, padded to 1824x1024): every ground-truth
polygon of the test split (``###`` ones too) is scaled by the resize factors,
shrunk like the DB kernel, filled with a probability in [0.6, 0.95], a few
faint false blobs (0.3-0.5) are added and the map is blurred. Without a data
root, 10-70 random rotated boxes per map are drawn instead.

    python benchmarks/postprocess.py --root /path/to/icdar2015 [--baseline] [--repeats 5]

Prints one JSON line per figure. ``--baseline`` also times MMOCR's procedure
step by step as MMOCR runs it (torch thresholding, array copies, shapely
area / length; re-implemented here) on the same maps, and checks that both
give identical output.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Tuple

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dbnetpp.polygon import offset_polygon  # noqa: E402
from dbnetpp.postprocess import DBPostProcessor  # noqa: E402

MAP_H, MAP_W = 1024, 1824
TEST_SCALE = (1820 / 1280, 1024 / 720)  # (sx, sy) of the test resize for 1280x720 images


def kernel(polygon: np.ndarray, shrink_ratio: float = 0.4) -> np.ndarray:
    """The DB shrunk kernel of a polygon (integer points), or an empty array."""
    from shapely.geometry import Polygon

    points = polygon.astype(np.int32)
    shape = Polygon(points)
    if shape.area < 1:
        return np.zeros((0, 2), np.float32)
    distance = int(shape.area * (1 - shrink_ratio**2) / (shape.length + 0.001) + 0.5)
    return offset_polygon(points, -distance)


def draw_map(polygons: List[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    prob = np.zeros((MAP_H, MAP_W), np.float32)
    for polygon in polygons:
        shrunk = kernel(polygon)
        if len(shrunk) >= 3:
            cv2.fillPoly(prob, [shrunk.astype(np.int32)], float(rng.uniform(0.6, 0.95)))
    for _ in range(int(rng.integers(2, 6))):  # faint false positives
        center = (int(rng.uniform(0, MAP_W)), int(rng.uniform(0, MAP_H)))
        axes = (int(rng.uniform(3, 25)), int(rng.uniform(3, 25)))
        cv2.ellipse(prob, center, axes, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(0.3, 0.5)), -1)
    prob = cv2.GaussianBlur(prob, (5, 5), 1.5)
    return np.clip(prob, 0.0, 1.0)


def random_boxes(rng: np.random.Generator) -> List[np.ndarray]:
    boxes = []
    for _ in range(int(rng.integers(10, 71))):
        center = (float(rng.uniform(30, MAP_W - 30)), float(rng.uniform(20, MAP_H - 20)))
        size = (float(rng.uniform(20, 250)), float(rng.uniform(12, 50)))
        boxes.append(cv2.boxPoints((center, size, float(rng.uniform(-30, 30)))))
    return boxes


def build_maps(root: str, num_maps: int, seed: int) -> Tuple[List[np.ndarray], str]:
    rng = np.random.default_rng(seed)
    if root:
        from dbnetpp.data.icdar2015 import ICDAR2015

        annotations = ICDAR2015(root, "test", require_images=False).annotations[:num_maps]
        scale = np.array(TEST_SCALE, dtype=np.float32)
        maps = [draw_map([p * scale for p in ann["polygons"]], rng) for ann in annotations]
        return maps, "icdar2015-test-gt"
    return [draw_map(random_boxes(rng), rng) for _ in range(num_maps)], "synthetic"


def mmocr_procedure(pp: DBPostProcessor, prob: torch.Tensor) -> Tuple[List[np.ndarray], List[float]]:
    """MMOCR's steps as MMOCR runs them, for timing and parity."""
    from shapely.geometry import Polygon

    text_mask = prob > pp.mask_thr
    score_map = prob.data.cpu().numpy().astype(np.float32)
    text_mask = text_mask.data.cpu().numpy().astype(np.uint8)
    contours, _ = cv2.findContours((text_mask * 255).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    height, width = score_map.shape
    polygons, scores = [], []
    for i, contour in enumerate(contours):
        if i > pp.max_candidates:
            break
        approx = cv2.approxPolyDP(contour, pp.epsilon_ratio * cv2.arcLength(contour, True), True)
        points = approx.reshape((-1, 2))
        if points.shape[0] < 4:
            continue
        shifted = points.copy()
        x0 = np.clip(np.floor(shifted[:, 0].min()).astype(np.int32), 0, width - 1)
        x1 = np.clip(np.ceil(shifted[:, 0].max()).astype(np.int32), 0, width - 1)
        y0 = np.clip(np.floor(shifted[:, 1].min()).astype(np.int32), 0, height - 1)
        y1 = np.clip(np.ceil(shifted[:, 1].max()).astype(np.int32), 0, height - 1)
        mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=np.uint8)
        shifted[:, 0] -= x0
        shifted[:, 1] -= y0
        cv2.fillPoly(mask, shifted.reshape(1, -1, 2).astype(np.int32), 1)
        score = cv2.mean(score_map[y0 : y1 + 1, x0 : x1 + 1], mask)[0]
        if score < pp.min_text_score:
            continue
        shape = Polygon(points)
        expanded = offset_polygon(points, shape.area * pp.unclip_ratio / shape.length).reshape(-1)
        if len(expanded) == 0:
            continue
        expanded = expanded.reshape(-1, 2)
        if pp.text_repr_type == "quad":
            rect = cv2.minAreaRect(expanded)
            flat = cv2.boxPoints(rect).flatten() if min(rect[1]) >= pp.min_text_width else []
        else:
            flat = expanded.flatten()
        if len(flat) < 8:
            continue
        polygons.append(np.asarray(flat, dtype=np.float32).reshape(-1, 2))
        scores.append(score)
    return polygons, [float(s) for s in torch.FloatTensor(scores)]


def time_per_map(fn, maps, repeats: int) -> float:
    for m in maps[: min(3, len(maps))]:  # warm-up
        fn(m)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for m in maps:
            fn(m)
        best = min(best, (time.perf_counter() - start) / len(maps))
    return best * 1e3


def main(args: argparse.Namespace) -> None:
    num_maps = 5 if args.quick else args.maps
    repeats = 1 if args.quick else args.repeats
    maps, source = build_maps(args.root, num_maps, args.seed)
    pp = DBPostProcessor(text_repr_type=args.text_repr_type)
    regions = sum(len(pp(m)[0]) for m in maps) / len(maps)
    common = {
        "maps": len(maps),
        "map_size": [MAP_H, MAP_W],
        "source": source,
        "regions_per_map": round(regions, 2),
        "text_repr_type": args.text_repr_type,
        "repeats": repeats,
        "cv2_threads": cv2.getNumThreads(),
        "torch_threads": torch.get_num_threads(),
    }
    ours = time_per_map(pp, maps, repeats)
    record = {"benchmark": "postprocess", "metric": "ms_per_map", "value": round(ours, 3), "unit": "ms"}
    print(json.dumps({**record, **common}))
    if args.baseline:
        tensors = [torch.from_numpy(m) for m in maps]
        identical = True
        for m, t in zip(maps, tensors):
            a, sa = pp(m)
            b, sb = mmocr_procedure(pp, t)
            identical &= sa == sb and len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
        base = time_per_map(lambda t: mmocr_procedure(pp, t), tensors, repeats)
        print(
            json.dumps(
                {
                    "benchmark": "postprocess_mmocr_procedure",
                    "metric": "ms_per_map",
                    "value": round(base, 3),
                    "unit": "ms",
                    "speedup": round(base / ours, 2),
                    "identical_output": bool(identical),
                    **common,
                }
            )
        )


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=add_help)
    parser.add_argument("--root", default=os.environ.get("DBNETPP_ICDAR2015_ROOT", ""), help="ICDAR 2015 root")
    parser.add_argument("--maps", type=int, default=100, help="number of maps (one per test GT file)")
    parser.add_argument("--repeats", type=int, default=5, help="timing passes over all maps (best is kept)")
    parser.add_argument("--quick", action="store_true", help="5 maps, 1 pass: a smoke test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-repr-type", default="quad", choices=["quad", "poly"])
    parser.add_argument("--baseline", action="store_true", help="also time MMOCR's procedure and check parity")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())

"""Drawing detections on images (OpenCV, BGR): plain detections, and detections scored against
the ground truth the way ``dbnetpp.metric.HmeanIoU`` scores them (matched, false positive,
missed, ignored), one image or a captioned grid of several.
"""

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from .metric import HmeanIoU

__all__ = [
    "COLORS",
    "caption",
    "draw_detections",
    "draw_evaluation",
    "grid_cells",
    "make_grid",
    "save_image",
    "save_evaluation_grid",
]

Color = Tuple[int, int, int]

# BGR colours of the evaluation drawings, keyed by the states of ``HmeanIoU.match``.
COLORS: Dict[str, Color] = {
    "matched": (0, 200, 0),  # green: detection (thick) and its ground truth (thin), IoU > 0.5
    "false_positive": (0, 0, 255),  # red: a detection that matches nothing
    "missed": (0, 255, 255),  # yellow: ground truth that no detection matches
    "ignored": (160, 160, 160),  # grey: ``###`` ground truth and the detections inside it
}
CAPTION_HEIGHT = 18  # pixels of the caption strip above each grid cell and of the legend strip


def draw_detections(
    image: np.ndarray,
    polygons: Sequence[np.ndarray],
    scores: Optional[Sequence[float]] = None,
    color: Color = (0, 255, 0),
    thickness: Optional[int] = None,
) -> np.ndarray:
    """A copy of ``image`` (BGR uint8 (H, W, 3)) with every polygon outlined and its score written
    above its top-most point.

    Args:
        polygons: each (K, 2) (or (2K,)) of (x, y) pixels of ``image``.
        scores: one per polygon, or None for outlines only.
        color: BGR outline colour.
        thickness: line width in pixels; default grows with the image size (1 px per 600 px).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a BGR uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    if scores is not None and len(scores) != len(polygons):
        raise ValueError(f"{len(polygons)} polygons but {len(scores)} scores")
    canvas = image.copy()
    if len(polygons) == 0:
        return canvas
    height, width = canvas.shape[:2]
    if thickness is None:
        thickness = max(1, round(max(height, width) / 600))
    points = [np.round(np.asarray(p, dtype=np.float64).reshape(-1, 1, 2)).astype(np.int32) for p in polygons]
    cv2.polylines(canvas, points, isClosed=True, color=color, thickness=thickness, lineType=cv2.LINE_AA)
    if scores is None:
        return canvas

    font, font_scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness
    for pts, score in zip(points, scores):
        label = f"{float(score):.2f}"
        (text_w, text_h), baseline = cv2.getTextSize(label, font, font_scale, thickness)
        top = pts[np.argmin(pts[:, 0, 1]), 0]
        # label box above the top-most vertex, kept inside the image
        x = int(np.clip(top[0], 0, max(0, width - text_w)))
        y = int(np.clip(top[1] - thickness, text_h + baseline, height - 1))
        cv2.rectangle(canvas, (x, y - text_h - baseline), (x + text_w, y), color, cv2.FILLED)
        cv2.putText(canvas, label, (x, y - baseline), font, font_scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return canvas


def _thickness(image: np.ndarray) -> int:
    return max(1, round(max(image.shape[:2]) / 300))


def draw_evaluation(
    image: np.ndarray,
    pred_polygons: Sequence[Any],
    pred_scores: Sequence[float],
    gt_polygons: Sequence[Any],
    gt_ignore: Sequence[bool],
    score_thr: Optional[float] = None,
    metric: Optional[HmeanIoU] = None,
    show_scores: bool = False,
    thickness: Optional[int] = None,
) -> Tuple[np.ndarray, Dict[str, int]]:
    """Ground truth and detections on a copy of ``image`` (BGR uint8 (H, W, 3)), coloured by how
    ``metric.match`` (default ``HmeanIoU()``, MMOCR's rule: IoU > 0.5, ``###`` ignore rule) scores
    them at ``score_thr`` (default: the metric's lowest threshold); see ``COLORS``.

    Detections below ``score_thr`` are not drawn. Polygons are (K, 2) or (2K,) (x, y) pixels of
    ``image``. Returns (picture of the same size, counts ``{"matched", "false_positive",
    "missed", "ignored_gt"}``).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a BGR uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    metric = HmeanIoU() if metric is None else metric
    state = metric.match(pred_polygons, pred_scores, gt_polygons, gt_ignore, score_thr)
    t = _thickness(image) if thickness is None else thickness
    scores = np.asarray(pred_scores, dtype=np.float32).reshape(-1)

    def select(states: List[str], wanted: str) -> List[int]:
        return [i for i, s in enumerate(states) if s == wanted]

    canvas = image.copy()
    gts = [np.asarray(g, dtype=np.float64).reshape(-1, 2) for g in gt_polygons]
    preds = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in pred_polygons]
    # ground truth first (thin where a detection covers it), detections on top
    for name, width in (("ignored", t + 1), ("matched", t), ("missed", t + 1)):
        idx = select(state["gt"], name)
        canvas = draw_detections(canvas, [gts[i] for i in idx], color=COLORS[name], thickness=width)
    for name, key in (("ignored", "ignored"), ("false_positive", "false_positive"), ("matched", "matched")):
        idx = select(state["pred"], name)
        labels = [float(scores[i]) for i in idx] if show_scores else None
        canvas = draw_detections(canvas, [preds[i] for i in idx], labels, color=COLORS[key], thickness=t + 1)
    counts = {
        "matched": len(state["pairs"]),
        "false_positive": state["pred"].count("false_positive"),
        "missed": state["gt"].count("missed"),
        "ignored_gt": state["gt"].count("ignored"),
    }
    return canvas, counts


def grid_cells(
    sizes: Sequence[Tuple[int, int]], columns: int = 4, gap: int = 4, max_side: int = 640
) -> Tuple[Tuple[int, int], List[Tuple[int, int, float]]]:
    """Layout of ``make_grid``: ((grid height, grid width), per image (x0, y0, scale)).

    Each (h, w) image is scaled by ``min(1, max_side / max(h, w))`` and placed at (x0, y0),
    below a caption strip of ``CAPTION_HEIGHT`` pixels, in a cell as large as the largest scaled
    image; a legend strip of ``CAPTION_HEIGHT`` pixels closes the grid.
    """
    if not sizes:
        raise ValueError("make_grid needs at least one image")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    scales = [min(1.0, max_side / max(h, w)) for h, w in sizes]
    cell_h = max(round(h * s) for (h, _), s in zip(sizes, scales))
    cell_w = max(round(w * s) for (_, w), s in zip(sizes, scales))
    cols = min(columns, len(sizes))
    rows = -(-len(sizes) // cols)
    row_h = CAPTION_HEIGHT + cell_h + gap
    cells = [
        (gap + (i % cols) * (cell_w + gap), gap + (i // cols) * row_h + CAPTION_HEIGHT, s)
        for i, s in enumerate(scales)
    ]
    height = gap + rows * row_h + CAPTION_HEIGHT
    width = max(gap + cols * (cell_w + gap), 400)  # room for the legend
    return (height, width), cells


def make_grid(
    images: Sequence[np.ndarray],
    captions: Optional[Sequence[str]] = None,
    columns: int = 4,
    gap: int = 4,
    max_side: int = 640,
    legend: bool = True,
) -> np.ndarray:
    """BGR uint8 images side by side (layout: ``grid_cells``), each under its caption, on white,
    with the colour legend of ``COLORS`` at the bottom."""
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    (height, width), cells = grid_cells([im.shape[:2] for im in images], columns, gap, max_side)
    grid = np.full((height, width, 3), 255, dtype=np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for k, (image, (x0, y0, s)) in enumerate(zip(images, cells)):
        if s != 1.0:
            image = cv2.resize(image, (round(image.shape[1] * s), round(image.shape[0] * s)),
                               interpolation=cv2.INTER_AREA)
        grid[y0 : y0 + image.shape[0], x0 : x0 + image.shape[1]] = image
        if captions is not None:
            cv2.putText(grid, captions[k], (x0, y0 - 5), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    if legend:
        x, y = gap, height - 5
        for name, color in COLORS.items():
            label = name.replace("_", " ")
            cv2.rectangle(grid, (x, y - 10), (x + 10, y), color, cv2.FILLED)
            cv2.putText(grid, label, (x + 14, y), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
            x += 14 + cv2.getTextSize(label, font, 0.4, 1)[0][0] + 12
    return grid


def save_image(path: Union[str, Path], image: np.ndarray, quality: int = 95) -> Path:
    """Write a BGR uint8 image (JPEG ``quality`` for .jpg), creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ok = cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    except cv2.error as e:
        raise ValueError(f"could not write an image to {path}: {str(e).strip().splitlines()[-1]}") from e
    if not ok:
        raise ValueError(f"could not write an image to {path}")
    return path


def caption(counts: Mapping[str, int], name: str = "") -> str:
    """One line: ``"name  TP 5  FP 1  miss 2"``."""
    text = f"TP {counts['matched']}  FP {counts['false_positive']}  miss {counts['missed']}"
    return f"{name}  {text}" if name else text


def save_evaluation_grid(
    path: Union[str, Path],
    source: Any,
    predictions: Mapping[int, Tuple[Sequence[Any], Sequence[float]]],
    score_thr: Optional[float] = None,
    columns: int = 4,
) -> Path:
    """Draw ``draw_evaluation`` for each ``index -> (polygons, scores)`` of ``predictions`` (in
    index order) on ``source[index]`` (a sample dict with ``image`` BGR uint8, ``polygons``,
    ``ignore``; detections in its pixels) and save them as one ``make_grid`` picture."""
    pictures, captions = [], []
    for index in sorted(predictions):
        sample = source[index]
        polygons, scores = predictions[index]
        picture, counts = draw_evaluation(
            sample["image"], polygons, scores, sample["polygons"], sample["ignore"], score_thr
        )
        pictures.append(picture)
        captions.append(caption(counts, f"#{index}"))
    return save_image(path, make_grid(pictures, captions, columns=columns))

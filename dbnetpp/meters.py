"""Running averages, the JSON-lines log and the loss / H-mean plot (OpenCV only)."""

import json
import math
import os
from collections import deque
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np


class SmoothedValue:
    """Mean over a sliding window and over everything seen."""

    def __init__(self, window: int = 20) -> None:
        self.window: deque = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(value)
        self.total += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return sum(self.window) / len(self.window) if self.window else math.nan

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def value(self) -> float:
        return self.window[-1] if self.window else math.nan


class JsonlLogger:
    """Appends one JSON object per line to ``path``; a no-op when ``path`` is None.

    Each line is flushed, so a crashed run keeps everything logged before the crash.
    """

    def __init__(self, path: Optional[Union[str, os.PathLike]]) -> None:
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        line = json.dumps({k: _jsonable(v) for k, v in record.items()}, allow_nan=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return _jsonable(v.item())
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def read_jsonl(path: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """All records of a JSON-lines file; a ValueError names the file and line of a bad one."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from e
    return records


Points = List[Tuple[float, float]]


def curves_from_log(records: Iterable[Mapping[str, Any]]) -> Tuple[Points, Points]:
    """(loss points, H-mean points) as (epoch, value) pairs from log records.

    Training lines (``"type": "train"``) give the loss at fractional epoch
    ``epoch + iter / iters``; evaluation lines give the H-mean after ``epoch + 1``
    epochs. A resumed run may repeat epochs: the latest record wins.
    """
    loss: Dict[float, float] = {}
    hmean: Dict[float, float] = {}
    for r in records:
        if r.get("type") == "train" and r.get("loss") is not None:
            loss[r["epoch"] + r["iter"] / max(r["iters"], 1)] = float(r["loss"])
        elif r.get("type") == "eval" and r.get("hmean") is not None:
            hmean[float(r["epoch"] + 1)] = float(r["hmean"])
    return sorted(loss.items()), sorted(hmean.items())


def plot_curves(
    loss: Sequence[Tuple[float, float]],
    hmean: Sequence[Tuple[float, float]],
    path: Union[str, os.PathLike],
    size: Tuple[int, int] = (900, 360),
) -> np.ndarray:
    """Draw loss (left panel) and H-mean (right panel) versus epoch; write a PNG.

    ``size`` is (width, height) in pixels. Returns the BGR uint8 image.
    """
    width, height = size
    canvas = np.full((height, width, 3), 255, np.uint8)
    half = width // 2
    _panel(canvas, (0, 0, half, height), loss, "train loss", (200, 80, 20), y_range=None)
    _panel(canvas, (half, 0, width - half, height), hmean, "H-mean", (40, 40, 200), y_range=(0.0, 1.0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", canvas)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode the plot for {path}")
    path.write_bytes(buf.tobytes())
    return canvas


def _panel(
    canvas: np.ndarray,
    box: Tuple[int, int, int, int],
    points: Sequence[Tuple[float, float]],
    title: str,
    color: Tuple[int, int, int],
    y_range: Optional[Tuple[float, float]],
) -> None:
    x0, y0, w, h = box
    left, right, top, bottom = x0 + 60, x0 + w - 20, y0 + 30, y0 + h - 40
    font = cv2.FONT_HERSHEY_SIMPLEX
    black, grey = (0, 0, 0), (200, 200, 200)
    cv2.putText(canvas, title, (left, y0 + 20), font, 0.55, black, 1, cv2.LINE_AA)
    cv2.putText(canvas, "epoch", ((left + right) // 2 - 20, y0 + h - 8), font, 0.45, black, 1, cv2.LINE_AA)

    pts = np.array([(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)], np.float64).reshape(-1, 2)
    x_lo, x_hi = (0.0, 1.0) if len(pts) == 0 else (min(0.0, pts[:, 0].min()), max(pts[:, 0].max(), 1e-9))
    if y_range is not None:
        y_lo, y_hi = y_range
    elif len(pts):
        y_lo, y_hi = min(0.0, pts[:, 1].min()), pts[:, 1].max()
    else:
        y_lo, y_hi = 0.0, 1.0
    if y_hi - y_lo < 1e-9:
        y_hi = y_lo + 1.0
    if x_hi - x_lo < 1e-9:
        x_hi = x_lo + 1.0

    def to_px(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        px = left + (x - x_lo) / (x_hi - x_lo) * (right - left)
        py = bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)
        return np.stack([px, py], axis=-1).round().astype(np.int32)

    for i in range(5):  # grid lines with tick labels
        fy = y_lo + (y_hi - y_lo) * i / 4
        fx = x_lo + (x_hi - x_lo) * i / 4
        (gx, gy) = to_px(np.array([fx]), np.array([fy]))[0]
        cv2.line(canvas, (left + 1, int(gy)), (right - 1, int(gy)), grey, 1)
        cv2.putText(canvas, f"{fy:.3g}", (x0 + 4, int(gy) + 4), font, 0.38, black, 1, cv2.LINE_AA)
        cv2.putText(canvas, f"{fx:.3g}", (int(gx) - 10, bottom + 15), font, 0.38, black, 1, cv2.LINE_AA)
    cv2.rectangle(canvas, (left, top), (right, bottom), black, 1)
    if len(pts) == 0:
        cv2.putText(canvas, "no data", ((left + right) // 2 - 30, (top + bottom) // 2), font, 0.5, grey, 1, cv2.LINE_AA)
        return
    poly = to_px(pts[:, 0], pts[:, 1])
    if len(poly) > 1:
        cv2.polylines(canvas, [poly.reshape(-1, 1, 2)], False, color, 2, cv2.LINE_AA)
    if len(poly) <= 50:
        for p in poly:
            cv2.circle(canvas, (int(p[0]), int(p[1])), 3, color, -1, cv2.LINE_AA)
    last_x, last_y = pts[-1]
    cv2.putText(canvas, f"last {last_y:.4g}", (right - 110, top + 18), font, 0.45, color, 1, cv2.LINE_AA)


def plot_log(log_path: Union[str, os.PathLike], png_path: Union[str, os.PathLike]) -> np.ndarray:
    """Read a ``log.jsonl`` and write its loss / H-mean curves to ``png_path``."""
    loss, hmean = curves_from_log(read_jsonl(log_path))
    return plot_curves(loss, hmean, png_path)

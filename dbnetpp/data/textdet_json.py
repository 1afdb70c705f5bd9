"""MMOCR's prepared text-detection layout: ``textdet_{train,test}.json`` plus images.

This is what MMOCR's dataset preparer writes for ICDAR 2015, Total-Text, SynthText and the
rest (TextDetPacker format)::

    {"metainfo": {...}, "data_list": [
        {"img_path": "textdet_imgs/train/img_1.jpg", "height": 720, "width": 1280,
         "instances": [{"polygon": [x1, y1, x2, y2, ...], "bbox": [...], "bbox_label": 0,
                        "ignore": false, "text": "..."}, ...]}, ...]}

``img_path`` is relative to the dataset root. Every image is kept, with or without
instances: MMOCR 1.0.1's ``OCRDataset`` does not override mmengine's no-op ``filter_data``,
so the configs' ``filter_cfg=dict(filter_empty_gt=True, min_size=32)`` has no effect (images
without text are re-drawn by the training pipeline, as in MMOCR).
"""

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np

from .base import IGNORE_TEXT, AnnotatedImages, read_text

__all__ = ["TextDetJSON", "load_textdet_json", "JSON_FILES"]

JSON_FILES = {"train": "textdet_train.json", "test": "textdet_test.json"}

PathLike = Union[str, os.PathLike]


class TextDetJSON(AnnotatedImages):
    """One split of an MMOCR-prepared dataset (Total-Text, SynthText, ICDAR 2015, ...).

    Args:
        root: dataset folder holding ``textdet_{split}.json`` and the images it names.
        split: ``"train"`` or ``"test"``.
        require_images: check at construction that every image exists (default). Large sets
            (SynthText: 858k images) may pass False: a missing image then fails when read.
    """

    def __init__(self, root: PathLike, split: str = "train", *, require_images: bool = True) -> None:
        if split not in JSON_FILES:
            raise ValueError(f"split must be one of {sorted(JSON_FILES)}, got {split!r}")
        self.root = Path(root)
        self.split = split
        path = self.root / JSON_FILES[split]
        if not path.is_file():
            raise FileNotFoundError(f"no {JSON_FILES[split]} under {self.root} (MMOCR's prepared {split} split)")
        self.image_paths, self.annotations = load_textdet_json(path, self.root)
        if require_images:
            missing = [p for p in self.image_paths if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"{len(missing)} image(s) named in {path} are missing, e.g. {missing[0]}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, images={len(self)})"


def load_textdet_json(path: PathLike, root: PathLike) -> Tuple[List[Path], List[Dict[str, Any]]]:
    """Parse a TextDetPacker JSON file: (image paths under ``root``, annotations).

    Raises:
        ValueError: naming the file and the entry (``data_list[i].instances[j].polygon``) for
            invalid JSON (or not UTF-8), a missing ``img_path`` / ``polygon``, or a polygon that is not an even
            number (>= 6) of finite coordinates.
    """
    path, root = Path(path), Path(root)
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    except RecursionError:
        raise ValueError(f"{path}: invalid JSON: nested too deeply") from None
    entries = data.get("data_list") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a dict with a 'data_list' list (MMOCR TextDetPacker format)")
    images: List[Path] = []
    annotations: List[Dict[str, Any]] = []
    for i, entry in enumerate(entries):
        where = f"{path}: data_list[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("img_path"), str):
            raise ValueError(f"{where}: missing key 'img_path' (a string)")
        instances = entry.get("instances", [])
        if not isinstance(instances, list):
            raise ValueError(f"{where}.instances: expected a list, got {type(instances).__name__}")
        polygons, ignore, texts = [], [], []
        for j, inst in enumerate(instances):
            if not isinstance(inst, dict) or "polygon" not in inst:
                raise ValueError(f"{where}.instances[{j}]: missing key 'polygon'")
            polygons.append(_json_polygon(inst["polygon"], f"{where}.instances[{j}].polygon"))
            ignore.append(bool(inst.get("ignore", False)))
            texts.append(str(inst.get("text", IGNORE_TEXT if ignore[-1] else "")))
        images.append(root / entry["img_path"])
        annotations.append({"polygons": polygons, "ignore": np.array(ignore, dtype=bool), "texts": texts})
    return images, annotations


def _json_polygon(values: Any, where: str) -> np.ndarray:
    try:
        with np.errstate(over="ignore"):
            poly = np.asarray(values, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{where}: not a list of numbers: {_short(values)}") from None
    if poly.size < 6 or poly.size % 2 != 0 or not np.isfinite(poly).all():
        raise ValueError(f"{where}: expected an even number (>= 6) of finite coordinates, got {_short(values)}")
    return poly.reshape(-1, 2)


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

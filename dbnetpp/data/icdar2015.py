"""ICDAR 2015 Incidental Scene Text (Robust Reading challenge 4, task 4.1).

Two layouts are read from ``root``:

- the official folders::

      ch4_training_images/img_N.jpg    ch4_training_localization_transcription_gt/gt_img_N.txt
      ch4_test_images/img_N.jpg        Challenge4_Test_Task1_GT/gt_img_N.txt   (or ..._Task4_GT)

- MMOCR's prepared layout: ``textdet_{train,test}.json`` (TextDetPacker format) with image
  paths relative to ``root`` (usually ``textdet_imgs/{train,test}/img_N.jpg``).

A ground-truth line is ``x1,y1,x2,y2,x3,y3,x4,y4,transcription`` (pixels, four corners
clockwise from the top-left); the transcription may contain commas and ``###`` marks a
"do not care" region.
"""

import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np

from .base import IGNORE_TEXT, AnnotatedImages, read_image, read_text
from .textdet_json import load_textdet_json

__all__ = ["ICDAR2015", "parse_gt_file", "read_image", "IGNORE_TEXT", "SPLITS"]

NUM_COORDS = 8
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

# split -> (images folder, candidate ground-truth folders, MMOCR annotation file)
SPLITS = {
    "train": ("ch4_training_images", ("ch4_training_localization_transcription_gt",), "textdet_train.json"),
    "test": ("ch4_test_images", ("Challenge4_Test_Task1_GT", "Challenge4_Test_Task4_GT"), "textdet_test.json"),
}

PathLike = Union[str, os.PathLike]


def natural_key(name: str) -> Tuple:
    """Sort key that orders embedded numbers by value: img_2 before img_10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def parse_gt_file(path: PathLike) -> Dict[str, Any]:
    """Read one Robust Reading ground-truth file.

    UTF-8 with or without BOM, LF or CRLF. Each line is stripped; empty lines are
    skipped; the first 8 comma-separated fields are the corner coordinates and the
    rest, joined back with ',', is the transcription (a line of exactly 8 fields has
    an empty one, as MMOCR reads it).

    Returns:
        dict with ``polygons`` (list of float32 (4, 2) arrays, (x, y) pixels),
        ``ignore`` (bool ndarray (n,), transcription == '###') and ``texts`` (list[str]).

    Raises:
        ValueError: ``path:line: ...`` for a line with fewer than 8 fields, a
            coordinate that is not a finite number, or bytes that are not UTF-8.
    """
    path = Path(path)
    lines = read_text(path).split("\n")  # CRLF -> LF; not UTF-8: ValueError naming the file
    polygons: List[np.ndarray] = []
    texts: List[str] = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        fields = line.split(",")
        if len(fields) < NUM_COORDS:
            raise ValueError(
                f"{path}:{number}: expected 'x1,y1,x2,y2,x3,y3,x4,y4,transcription', "
                f"got {len(fields)} comma-separated fields: {line!r}"
            )
        coords = []
        for field in fields[:NUM_COORDS]:
            try:
                value = float(field)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise ValueError(f"{path}:{number}: coordinate {field.strip()!r} is not a finite number: {line!r}")
            coords.append(value)
        polygons.append(np.array(coords, dtype=np.float32).reshape(-1, 2))
        texts.append(",".join(fields[NUM_COORDS:]))
    ignore = np.array([text == IGNORE_TEXT for text in texts], dtype=bool)
    return {"polygons": polygons, "ignore": ignore, "texts": texts}


class ICDAR2015(AnnotatedImages):
    """ICDAR 2015 text detection split, indexable.

    ``dataset[i]`` is a dict ``{"image": BGR uint8 (H, W, 3), "polygons": list of float32
    (K, 2) arrays (x, y pixels), "ignore": bool ndarray (n,), "texts": list[str],
    "path": str (the image file), "ori_size": (height, width)}``.

    Annotations are parsed once, at construction; ``load_annotations(i)`` and
    ``annotations`` give them without decoding any image.

    Args:
        root: dataset folder, holding either the official folders or MMOCR's
            ``textdet_{split}.json`` (the JSON wins when both are there).
        split: ``"train"`` or ``"test"``.
        require_images: if True (default) the image folder must exist and every image
            is checked for existence here. If False, the official layout may lack its
            image folder (e.g. annotations only): samples are then listed from the
            ground-truth files and only ``__getitem__`` needs the image.
    """

    def __init__(self, root: PathLike, split: str = "train", *, require_images: bool = True) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise FileNotFoundError(f"ICDAR 2015 root is not a directory: {self.root}")
        json_file = self.root / SPLITS[split][2]
        if json_file.is_file():
            self.layout = "mmocr"
            self.image_paths, self.annotations = load_textdet_json(json_file, self.root)
        else:
            self.layout = "official"
            self.image_paths, self.annotations = _load_official(self.root, split, require_images)
        if require_images:
            missing = [p for p in self.image_paths if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"{len(missing)} image(s) of the {split} split are missing, e.g. {missing[0]}")

    def __repr__(self) -> str:
        name, root = type(self).__name__, str(self.root)
        return f"{name}(root={root!r}, split={self.split!r}, layout={self.layout!r}, images={len(self)})"


def _load_official(root: Path, split: str, require_images: bool) -> Tuple[List[Path], List[Dict[str, Any]]]:
    image_name, gt_names, json_name = SPLITS[split]
    image_dir = root / image_name
    gt_dir = next((root / name for name in gt_names if (root / name).is_dir()), None)
    if gt_dir is None:
        looked_for = " or ".join(f"{name}/" for name in gt_names)
        raise FileNotFoundError(
            f"no ICDAR 2015 {split} annotations under {root}: looked for {json_name} or {looked_for}"
        )
    if image_dir.is_dir():
        images = [p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        images.sort(key=lambda p: natural_key(p.name))
        gt_files = [gt_dir / f"gt_{p.stem}.txt" for p in images]
        missing = [str(g) for g, p in zip(gt_files, images) if not g.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) in {image_dir} have no ground truth, e.g. {missing[0]}")
    elif require_images:
        raise FileNotFoundError(
            f"no ICDAR 2015 {split} images under {root}: looked for {image_name}/ "
            "(pass require_images=False to read the annotations alone)"
        )
    else:
        gt_files = sorted(gt_dir.glob("gt_*.txt"), key=lambda p: natural_key(p.name))
        images = [image_dir / f"{p.stem[len('gt_'):]}.jpg" for p in gt_files]
    if not gt_files:
        raise FileNotFoundError(f"no ICDAR 2015 {split} samples found under {root} ({gt_dir}, {image_dir})")
    return images, [parse_gt_file(g) for g in gt_files]

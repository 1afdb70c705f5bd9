"""One entry point for the recipes' datasets: ``open_dataset(root, split, kind)``.

=========== ================================================= ===========================
kind        layouts read under ``root``                        recipes
=========== ================================================= ===========================
icdar2015   ``textdet_{split}.json`` (MMOCR) or the official   ``*_icdar2015``
            ``ch4_*`` folders (:class:`ICDAR2015`)
totaltext   ``textdet_{split}.json`` (MMOCR)                   ``*_totaltext``
synthtext   ``textdet_train.json`` (MMOCR) or the official     ``*_100k_synthtext``
            release, ``gt.mat`` + image folders (:class:`SynthText`; train only)
=========== ================================================= ===========================

``fix_polygons=N`` applies MMOCR's ``FixInvalidPolygon(min_poly_points=N)`` to every sample's
ground truth as it is loaded, i.e. right after ``LoadOCRAnnotations``, where the Total-Text
and SynthText pipelines place it (Total-Text's test pipeline too).
"""

import os
from typing import Any, Dict, Optional, Union

import numpy as np

from ..config import DATASET_KINDS
from .icdar2015 import ICDAR2015
from .synthtext import GT_FILE, SynthText
from .textdet_json import JSON_FILES, TextDetJSON
from .transforms import fix_invalid_polygons

__all__ = ["open_dataset", "FixedPolygons", "DATASET_KINDS"]

PathLike = Union[str, os.PathLike]


def open_dataset(root: PathLike, split: str = "train", kind: str = "icdar2015", *, fix_polygons: Optional[int] = None):
    """The ``split`` (``"train"`` / ``"test"``) of the ``kind`` dataset under ``root``, as a sample source.

    Samples are ``{"image": BGR uint8 (H, W, 3), "polygons": list of float32 (K, 2), "ignore",
    "texts", "path", "ori_size"}``. Raises FileNotFoundError naming what was looked for.
    """
    if kind not in DATASET_KINDS:
        raise ValueError(f"kind must be one of {DATASET_KINDS}, got {kind!r}")
    if split not in JSON_FILES:
        raise ValueError(f"split must be one of {sorted(JSON_FILES)}, got {split!r}")
    root = os.fspath(root)
    has_json = os.path.isfile(os.path.join(root, JSON_FILES[split]))
    if kind == "icdar2015":
        source: Any = ICDAR2015(root, split)
    elif kind == "totaltext":
        source = TextDetJSON(root, split)
    elif has_json:  # SynthText, MMOCR-prepared: 858k images, checked when read
        source = TextDetJSON(root, split, require_images=False)
    elif os.path.isfile(os.path.join(root, GT_FILE)):
        if split != "train":
            raise FileNotFoundError(
                f"SynthText has no {split} split (found {GT_FILE} under {root}, no {JSON_FILES[split]})"
            )
        source = SynthText(root)
    else:
        raise FileNotFoundError(f"no SynthText {split} split under {root}: looked for {JSON_FILES[split]} or {GT_FILE}")
    return source if fix_polygons is None else FixedPolygons(source, fix_polygons)


class FixedPolygons:
    """A source whose samples went through MMOCR's ``FixInvalidPolygon('fix', min_poly_points)``.

    Polygons with < 3 points are removed (with their ``ignore`` flag and text); invalid ones or
    ones with fewer than ``min_poly_points`` points become the exterior ring of their shapely
    fix (see :func:`~dbnetpp.data.transforms.fix_invalid_polygons`).
    """

    def __init__(self, source: Any, min_poly_points: int = 4) -> None:
        if int(min_poly_points) < 3:
            raise ValueError(f"min_poly_points must be >= 3, got {min_poly_points}")
        self.source = source
        self.min_poly_points = int(min_poly_points)

    def __len__(self) -> int:
        return len(self.source)

    def _fix(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        polygons, keep = fix_invalid_polygons(sample["polygons"], self.min_poly_points)
        index = np.asarray(keep, dtype=np.int64)
        sample["polygons"] = polygons
        sample["ignore"] = np.asarray(sample["ignore"], dtype=bool)[index] if keep else np.zeros(0, dtype=bool)
        if "texts" in sample:
            sample["texts"] = [sample["texts"][i] for i in keep]
        return sample

    def load_annotations(self, index: int) -> Dict[str, Any]:
        return self._fix(self.source.load_annotations(index))

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self._fix(self.source[index])

    def __getattr__(self, name: str) -> Any:  # root, split, image_paths, ... of the wrapped source
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, min_poly_points={self.min_poly_points})"

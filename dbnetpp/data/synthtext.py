"""SynthText (Gupta et al., CVPR 2016) read from the official release: ``gt.mat`` + image folders.

The release is one folder::

    SynthText/gt.mat   SynthText/1/ant+hill_1_0.jpg   ...   SynthText/200/...

``gt.mat`` (MATLAB v5, read with scipy: ``pip install 'dbnetpp[synthtext]'``) holds three
1 x N cell arrays, one entry per image:

- ``imnames{i}``: image path relative to the folder, e.g. ``'8/ballet_106_0.jpg'``;
- ``wordBB{i}``: word quadrilaterals, 2 x 4 x K (x row, y row; four corners clockwise from
  the top-left), or 2 x 4 for an image with one word;
- ``txt{i}``: text lines (a char matrix, rows padded with blanks) whose whitespace-separated
  words are the K words of ``wordBB{i}``, in order.

SynthText has no "do not care" words and no test split. ``charBB`` is not read.
"""

import os
from pathlib import Path
from typing import Any, Dict, List, Union

import numpy as np

from .base import AnnotatedImages

__all__ = ["SynthText", "load_gt_mat", "GT_FILE"]

GT_FILE = "gt.mat"
PathLike = Union[str, os.PathLike]


def load_gt_mat(path: PathLike) -> Dict[str, np.ndarray]:
    """``imnames``, ``wordBB`` and ``txt`` of a SynthText ``gt.mat``, each a flat object array (N,).

    Raises:
        ImportError: scipy is missing (the ``synthtext`` extra).
        ValueError: naming the file for a missing key or cells of different lengths.
    """
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ImportError(
            f"reading SynthText's {Path(path).name} needs scipy: pip install 'dbnetpp[synthtext]' (or scipy)"
        ) from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SynthText ground truth not found: {path}")
    try:
        mat = loadmat(str(path), variable_names=("imnames", "wordBB", "txt"))
    except (ValueError, TypeError, NotImplementedError) as err:
        raise ValueError(f"{path}: not a readable MATLAB v5 file: {err}") from None
    out = {}
    for key in ("imnames", "wordBB", "txt"):
        if key not in mat:
            found = sorted(k for k in mat if not k.startswith("__"))
            raise ValueError(f"{path}: no {key!r} cell array (keys: {found})")
        out[key] = np.asarray(mat[key], dtype=object).reshape(-1)
    lengths = {key: len(value) for key, value in out.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{path}: imnames, wordBB and txt differ in length: {lengths}")
    return out


def _cell_strings(cell: Any) -> List[str]:
    return [str(s) for s in np.asarray(cell).reshape(-1)]


class SynthText(AnnotatedImages):
    """The official SynthText release, indexable like :class:`~dbnetpp.data.ICDAR2015`.

    ``gt.mat`` is read once; each entry is parsed (and checked) when it is accessed, so
    opening the 858k-image set costs one ``loadmat``. ``dataset[i]`` is ``{"image", "polygons":
    list of float32 (4, 2) (x, y pixels), "ignore": all False, "texts": the words, "path",
    "ori_size"}``.

    Args:
        root: the folder holding ``gt.mat`` and the image folders.
        gt_file: name of the ground-truth file under ``root``.
    """

    def __init__(self, root: PathLike, gt_file: str = GT_FILE) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"SynthText root is not a directory: {self.root}")
        self.gt_path = self.root / gt_file
        gt = load_gt_mat(self.gt_path)
        self._imnames, self._word_bb, self._txt = gt["imnames"], gt["wordBB"], gt["txt"]
        if len(self) == 0:
            raise ValueError(f"{self.gt_path}: no images")
        first = self.image_path(0)
        if not first.is_file():
            raise FileNotFoundError(f"first image of {self.gt_path} is missing: {first}")

    def __len__(self) -> int:
        return len(self._imnames)

    def image_path(self, index: int) -> Path:
        names = _cell_strings(self._imnames[index])
        if len(names) != 1 or not names[0].strip():
            raise ValueError(f"{self.gt_path}: imnames[{index}] is not one file name: {names!r}")
        return self.root / names[0].strip()

    def load_annotations(self, index: int) -> Dict[str, Any]:
        """Entry ``index`` parsed: ``polygons``, ``ignore``, ``texts``, ``path``.

        Raises:
            ValueError: naming ``gt.mat``, the entry and its image for a ``wordBB`` that is not
                2 x 4 (x K) finite numbers, or a word count that differs from the boxes'.
        """
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        path = self.image_path(index)
        where = f"{self.gt_path}: entry {index} ({path.name})"
        try:
            boxes = np.asarray(self._word_bb[index], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: wordBB is not numeric") from None
        if boxes.shape == (2, 4):
            boxes = boxes[:, :, None]  # MATLAB drops the trailing singleton: one word
        if boxes.ndim != 3 or boxes.shape[:2] != (2, 4) or not np.isfinite(boxes).all():
            raise ValueError(f"{where}: wordBB must be 2x4xK finite numbers, got shape {boxes.shape}")
        words = " ".join(_cell_strings(self._txt[index])).split()
        if len(words) != boxes.shape[2]:
            raise ValueError(f"{where}: {len(words)} words in txt but {boxes.shape[2]} boxes in wordBB")
        polygons = list(boxes.transpose(2, 1, 0).astype(np.float32))  # K x (4 corners, (x, y))
        return {
            "polygons": polygons,
            "ignore": np.zeros(len(polygons), dtype=bool),
            "texts": words,
            "path": str(path),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, images={len(self)})"

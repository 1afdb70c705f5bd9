"""Training and test datasets: contract samples -> network inputs (and DB targets).

A *source* is anything indexable that returns samples ``{"image": BGR uint8 (H, W, 3),
"polygons": list of float32 (K, 2), "ignore": bool (n,), "texts", "path", "ori_size"}``:
:class:`~dbnetpp.data.ICDAR2015`, :class:`~dbnetpp.data.SyntheticText`, a list of dicts.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..preprocess import batch_images, normalize_image
from .sources import FixedPolygons
from .targets import db_targets
from .transforms import MIN_SIDE_RATIO, TEST_SCALE, TRAIN_SIZE, resize_for_test, train_transform

MAX_REFETCH = 1000  # MMOCR's BaseDataset.max_refetch
TARGET_KEYS = ("shrink_map", "shrink_mask", "thr_map", "thr_mask")


def _describe(source: Any) -> str:
    text = repr(source)
    return text if len(text) <= 120 else f"<{type(source).__name__} of {len(source)} samples>"


def _get_sample(source: Any, index: int, keys: Sequence[str]) -> Dict[str, Any]:
    sample = source[index]
    if not isinstance(sample, dict):
        raise TypeError(f"{type(source).__name__}[{index}] is a {type(sample).__name__}, expected a dict sample")
    for key in keys:
        if key not in sample:
            raise KeyError(f"{type(source).__name__}[{index}] has no {key!r} (keys: {sorted(sample)})")
    return sample


class TrainDataset(Dataset):
    """DBNet++ training samples: MMOCR's train pipeline (REFERENCE §8) plus DB targets.

    ``dataset[i]`` is ``{"image": float32 (3, size, size) normalised RGB, "shrink_map",
    "shrink_mask", "thr_map", "thr_mask": float32 (size, size)}``. As in MMOCR the
    transformed image is zero padded (uint8) to size x size before normalisation, so the
    padding holds normalised black.

    Every random draw of sample i comes from ``numpy.random.default_rng([seed, epoch, i])``:
    samples are reproducible whatever the number of DataLoader workers. When the pipeline
    drops every polygon, another index is drawn from the same generator (MMOCR re-samples
    up to 1000 times).

    Args:
        source: indexable source of samples (ICDAR2015, SyntheticText, ...).
        size: output side in pixels (640 in the recipe; e.g. 256 for a CPU preset).
        seed: base seed.
        fused: render each image with one warp (fast) or step by step as MMOCR does; see
            :func:`~dbnetpp.data.transforms.train_transform`.
        fix_polygons: MMOCR's ``FixInvalidPolygon(min_poly_points=N)`` right after loading
            (Total-Text, SynthText: 4); None: off. ``open_dataset(..., fix_polygons=N)`` does the
            same in the source (applying it twice changes nothing: fixed polygons are valid).
        min_side_ratio: ``RandomCrop``'s smallest crop side / image side (MMOCR: 0.1).
    """

    def __init__(
        self,
        source: Any,
        size: int = TRAIN_SIZE,
        seed: int = 0,
        fused: bool = True,
        fix_polygons: Optional[int] = None,
        min_side_ratio: float = MIN_SIDE_RATIO,
    ) -> None:
        if fix_polygons is not None:
            source = FixedPolygons(source, fix_polygons)
        if len(source) == 0:
            raise ValueError(f"{type(source).__name__} source is empty")
        if int(size) < 32:
            raise ValueError(f"size must be >= 32 pixels, got {size}")
        self.source = source
        self.size = int(size)
        self.seed = int(seed)
        self.fused = fused
        if not 0 < float(min_side_ratio) <= 1:
            raise ValueError(f"min_side_ratio must be in (0, 1], got {min_side_ratio}")
        self.min_side_ratio = float(min_side_ratio)
        # Shared memory: set_epoch in the main process reaches persistent workers too.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's random stream; call before iterating the DataLoader."""
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index = int(index) % len(self)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        for _ in range(MAX_REFETCH + 1):
            sample = _get_sample(self.source, index, ("image", "polygons", "ignore"))
            out = train_transform(
                sample["image"], sample["polygons"], sample["ignore"], rng, self.size, self.fused, self.min_side_ratio
            )
            if out is not None:
                break
            index = int(rng.integers(len(self.source)))
        else:
            raise RuntimeError(
                f"no sample of {type(self.source).__name__} kept a text polygon through the train pipeline "
                f"after {MAX_REFETCH} re-draws: does the source have annotations?"
            )
        targets = db_targets(out.polygons, out.ignore, self.size, self.size)
        item = {"image": normalize_image(out.image)}
        item.update({key: torch.from_numpy(targets[key]) for key in TARGET_KEYS})
        return item

    def __repr__(self) -> str:
        name, source = type(self).__name__, _describe(self.source)
        return f"{name}({source}, size={self.size}, seed={self.seed}, fused={self.fused})"


class TestDataset(Dataset):
    """Evaluation samples: test resize (REFERENCE §8 test) and normalisation, no padding.

    ``dataset[i]`` is ``{"image": float32 (3, h, w) normalised RGB, "scale": (sx, sy)
    (resized / original, per axis), "polygons", "ignore", "path", "ori_size"}``; the ground
    truth stays in original-image pixels, as MMOCR loads it after the resize.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, source: Any, scale: Tuple[int, int] = TEST_SCALE, fix_polygons: Optional[int] = None) -> None:
        """``fix_polygons``: FixInvalidPolygon on the ground truth, as Total-Text's test pipeline (4)."""
        if fix_polygons is not None:
            source = FixedPolygons(source, fix_polygons)
        if len(scale) != 2 or min(scale) <= 0:
            raise ValueError(f"scale must be (long side, short side) > 0, got {scale!r}")
        self.source = source
        self.scale = (int(scale[0]), int(scale[1]))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        sample = _get_sample(self.source, index, ("image", "polygons", "ignore", "path"))
        image = sample["image"]
        resized, scale = resize_for_test(image, self.scale)
        return {
            "image": normalize_image(resized),
            "scale": scale,
            "polygons": sample["polygons"],
            "ignore": np.asarray(sample["ignore"], dtype=bool),
            "path": sample["path"],
            "ori_size": tuple(sample.get("ori_size", image.shape[:2])),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_describe(self.source)}, scale={self.scale})"


def collate_train(batch: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack :class:`TrainDataset` items: ``image`` (N, 3, S, S) and the four (N, S, S) targets."""
    if not batch:
        raise ValueError("collate_train got an empty batch")
    return {key: torch.stack([item[key] for item in batch]) for key in batch[0]}


def collate_test(batch: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Batch :class:`TestDataset` items.

    Returns ``images`` (N, 3, H, W), zero padded bottom/right to multiples of 32 by
    :func:`~dbnetpp.preprocess.batch_images`, and lists ``scale``, ``polygons``,
    ``ignore``, ``path``, ``ori_size`` (one entry per image).
    """
    if not batch:
        raise ValueError("collate_test got an empty batch")
    out: Dict[str, Any] = {"images": batch_images([item["image"] for item in batch])}
    for key in ("scale", "polygons", "ignore", "path", "ori_size"):
        out[key] = [item[key] for item in batch]
    return out

"""What every annotated image set shares: image decoding and the sample contract."""

import os
from pathlib import Path
from typing import Any, Dict, List, Union

import cv2
import numpy as np

__all__ = ["AnnotatedImages", "read_image", "IGNORE_TEXT"]

IGNORE_TEXT = "###"  # transcription of a "do not care" region

PathLike = Union[str, os.PathLike]


def read_image(path: PathLike) -> np.ndarray:
    """Decode an image as MMOCR's ``color_ignore_orientation`` does: BGR uint8 (H, W, 3).

    EXIF orientation is ignored. Raises FileNotFoundError / ValueError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    data = np.fromfile(str(path), dtype=np.uint8)  # bytes + imdecode, like mmcv; safe for non-ASCII paths
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    if image is None:
        raise ValueError(f"could not decode image: {path}")
    return image


class AnnotatedImages:
    """Indexable images with parsed annotations: ``image_paths[i]`` and ``annotations[i]``
    (``{"polygons": list of float32 (K, 2), "ignore": bool (n,), "texts": list[str]}``).

    ``dataset[i]`` is ``{"image": BGR uint8 (H, W, 3), "polygons", "ignore", "texts", "path",
    "ori_size": (height, width)}``; ``load_annotations(i)`` is the same without decoding the image.
    """

    image_paths: List[Path]
    annotations: List[Dict[str, Any]]

    def __len__(self) -> int:
        return len(self.image_paths)

    def load_annotations(self, index: int) -> Dict[str, Any]:
        """Sample ``index`` without the image: ``polygons``, ``ignore``, ``texts``, ``path`` (copies)."""
        ann = self.annotations[index]
        return {
            "polygons": [p.copy() for p in ann["polygons"]],
            "ignore": ann["ignore"].copy(),
            "texts": list(ann["texts"]),
            "path": str(self.image_paths[index]),
        }

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        sample = self.load_annotations(index)
        image = read_image(sample["path"])
        sample["image"] = image
        sample["ori_size"] = (int(image.shape[0]), int(image.shape[1]))
        return sample

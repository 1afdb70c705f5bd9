"""What every annotated image set shares: image decoding and the sample contract."""

import io
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import cv2
import numpy as np

__all__ = ["AnnotatedImages", "read_image", "read_text", "image_size", "IGNORE_TEXT", "MAX_IMAGE_PIXELS"]

IGNORE_TEXT = "###"  # transcription of a "do not care" region

# Images larger than this are refused before decoding (their header is read first): a decoded
# BGR image costs 3 bytes per pixel and the test resize as much again, so 100 megapixels stay
# under ~1 GB. Raise it (``dbnetpp.data.base.MAX_IMAGE_PIXELS = ...``) for larger photos.
MAX_IMAGE_PIXELS = 100_000_000

PathLike = Union[str, os.PathLike]


def read_text(path: PathLike) -> str:
    """A UTF-8 text file (a BOM is dropped; CRLF and CR become LF). Raises ValueError
    ``path:line: not UTF-8 text ...`` for other bytes, FileNotFoundError when missing."""
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}: {err.reason})"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_image(path: PathLike) -> np.ndarray:
    """Decode an image as MMOCR's ``color_ignore_orientation`` does: BGR uint8 (H, W, 3).

    EXIF orientation is ignored. The header is read first: an image of more than
    ``MAX_IMAGE_PIXELS`` pixels is refused without being decoded. Raises FileNotFoundError /
    ValueError naming the file (empty, truncated, not an image, too large).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    data = np.fromfile(str(path), dtype=np.uint8)  # bytes + imdecode, like mmcv; safe for non-ASCII paths
    if data.size == 0:
        raise ValueError(f"could not decode image: {path} (empty file)")
    size = image_size(data)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"image too large: {path} is {size[0]}x{size[1]} pixels, more than the limit of "
            f"{MAX_IMAGE_PIXELS:,} (dbnetpp.data.base.MAX_IMAGE_PIXELS)"
        )
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None or image.size == 0:
        raise ValueError(f"could not decode image: {path}")
    return image


def image_size(data: Union[bytes, np.ndarray]) -> Optional[Tuple[int, int]]:
    """(width, height) from an encoded image's header, without decoding its pixels; None when
    the header cannot be read (the decoder then has the last word)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with torchvision
        return None
    buffer = io.BytesIO(data.tobytes() if isinstance(data, np.ndarray) else data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning: the limit is ours
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(buffer) as im:
                width, height = im.size
        except Exception:  # not a format Pillow knows, or a broken header
            return None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    return int(width), int(height)


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

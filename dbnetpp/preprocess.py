"""Input normalisation, as MMOCR's TextDetDataPreprocessor does it.

BGR uint8 (H, W, 3) -> RGB float, ``(x - mean) / std`` with ImageNet statistics
(RGB order), then zero padding at the bottom/right so H and W are multiples of 32.
"""

from typing import Sequence, Tuple, Union

import numpy as np
import torch

MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)
SIZE_DIVISOR = 32
_MEAN = torch.tensor(MEAN_RGB).view(3, 1, 1)
_STD = torch.tensor(STD_RGB).view(3, 1, 1)


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """BGR uint8 image (H, W, 3) -> normalised RGB float32 tensor (3, H, W). No padding."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"expected a BGR image of shape (H, W, 3), got {type(image).__name__} with shape {shape}")
    height, width = image.shape[:2]
    out = torch.empty((3, height, width), dtype=torch.float32)
    for c in range(3):  # BGR -> RGB, one strided copy per channel
        out[c].copy_(torch.from_numpy(image[:, :, 2 - c]))
    return out.sub_(_MEAN).div_(_STD)


def pad_to_divisor(height: int, width: int, divisor: int = SIZE_DIVISOR) -> Tuple[int, int]:
    """Smallest (H, W) >= (height, width) that are multiples of ``divisor``."""
    return (-(-height // divisor) * divisor, -(-width // divisor) * divisor)


def batch_images(
    images: Sequence[Union[np.ndarray, torch.Tensor]], divisor: int = SIZE_DIVISOR
) -> torch.Tensor:
    """Stack images into one (N, 3, H, W) float tensor, zero-padded bottom/right.

    Each item is either a BGR uint8 array (H, W, 3), normalised here, or an
    already normalised (3, H, W) tensor. H and W of the batch are the largest
    ones rounded up to a multiple of ``divisor`` (0 in normalised space).
    """
    if len(images) == 0:
        raise ValueError("batch_images needs at least one image")
    tensors = [img if isinstance(img, torch.Tensor) else normalize_image(img) for img in images]
    for t in tensors:
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"expected normalised tensors of shape (3, H, W), got {tuple(t.shape)}")
    height, width = pad_to_divisor(max(t.shape[1] for t in tensors), max(t.shape[2] for t in tensors), divisor)
    batch = tensors[0].new_zeros((len(tensors), 3, height, width))
    for i, t in enumerate(tensors):
        batch[i, :, : t.shape[1], : t.shape[2]] = t
    return batch

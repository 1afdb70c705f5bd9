"""Modulated deformable convolution (DCNv2) operator.

Offset layout and boundary rule are torchvision's (= mmcv's): for tap k = i*kw + j,
offset channel 2k is dy and 2k+1 is dx; mask channel k.
"""

from typing import Optional, Tuple

import torch
from torchvision.ops import deform_conv2d as tv_deform_conv2d


def modulated_deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: Tuple[int, int] = (1, 1),
    padding: Tuple[int, int] = (1, 1),
    dilation: Tuple[int, int] = (1, 1),
    impl: str = "auto",
) -> torch.Tensor:
    """x (N, C, H, W), offset (N, 2*kh*kw, Ho, Wo), mask (N, kh*kw, Ho, Wo) or None,
    weight (O, C, kh, kw) -> (N, O, Ho, Wo)."""
    # "auto" picks the fastest correct implementation; for now only torchvision exists.
    if impl not in ("auto", "torchvision"):
        raise ValueError(f"unknown deformable-conv implementation {impl!r}")
    return tv_deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask)

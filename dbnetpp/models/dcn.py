"""Modulated deformable convolution layer (DCNv2), equivalent to mmcv's ``ModulatedDeformConv2dPack``.

A plain ``conv_offset`` convolution predicts, for every output pixel, 2 offsets (dy, dx) and one
modulation mask logit per kernel tap; the deformable convolution then samples the input
bilinearly at the displaced taps and weights each sample by ``sigmoid(mask logit)``.

"Deformable ConvNets v2: More Deformable, Better Results", https://arxiv.org/abs/1811.11168
"""

import math
from typing import Tuple, Union

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from dbnetpp.ops import deform_conv

from .layers import Conv2d

__all__ = ["ModulatedDeformConv2d"]


class ModulatedDeformConv2d(nn.Module):
    """DCNv2 layer with its own offset/mask predictor (mmcv's ``ModulatedDeformConv2dPack``).

    Args:
        in_channels, out_channels: channels of input and output.
        kernel_size, stride, padding, dilation: as for ``nn.Conv2d`` (int or pair).
        bias: whether the deformable convolution has a bias (``conv_offset`` always has one).
        deform_groups: number of offset groups (input channels split into this many groups,
            each with its own offsets and masks).
        impl: implementation handed to ``dbnetpp.ops.deform_conv.modulated_deform_conv2d``
            ("auto" picks the fastest correct one); a plain attribute, switchable at any time.

    Parameters (state-dict names as mmcv): ``weight`` (out, in, kh, kw), ``bias`` (out,) only if
    ``bias``, ``conv_offset.weight`` (3*dg*kh*kw, in, kh, kw), ``conv_offset.bias`` (3*dg*kh*kw,).

    Offset layout: ``conv_offset`` output channels ``[0, 2*dg*kh*kw)`` are the offsets as they are
    (for tap k = i*kw + j of group g, channel 2*(g*kh*kw + k) is dy and the next one dx, in input
    pixels), the remaining dg*kh*kw channels are mask logits. Input (N, in, H, W) ->
    (N, out, Ho, Wo) with the usual convolution output size.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Tuple[int, int]] = 3,
        stride: Union[int, Tuple[int, int]] = 1,
        padding: Union[int, Tuple[int, int]] = 1,
        dilation: Union[int, Tuple[int, int]] = 1,
        bias: bool = False,
        deform_groups: int = 1,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if in_channels % deform_groups != 0:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by deform_groups ({deform_groups})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.deform_groups = deform_groups
        self.impl = impl

        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        kh, kw = self.kernel_size
        self.conv_offset = Conv2d(
            in_channels,
            deform_groups * 3 * kh * kw,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmcv init: weight ~ U(-1/sqrt(in*kh*kw), +...), bias 0, ``conv_offset`` zero."""
        n = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        bound = 1.0 / math.sqrt(n)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.init_offset()

    def init_offset(self) -> None:
        """Zero ``conv_offset``: offsets 0 and mask 0.5 everywhere (0.5 x a plain convolution)."""
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def offset_and_mask(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (N, in, H, W) -> offset (N, 2*dg*kh*kw, Ho, Wo), mask in (0, 1) (N, dg*kh*kw, Ho, Wo)."""
        out = self.conv_offset(x)
        n_offset = 2 * self.deform_groups * self.kernel_size[0] * self.kernel_size[1]
        return out[:, :n_offset], torch.sigmoid(out[:, n_offset:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = self.offset_and_mask(x)
        return deform_conv.modulated_deform_conv2d(
            x,
            offset,
            mask,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, deform_groups={self.deform_groups}"
        )
        if self.bias is None:
            s += ", bias=False"
        return s + f", impl={self.impl!r}"

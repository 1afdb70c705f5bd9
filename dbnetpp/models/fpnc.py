"""FPNC neck: FPN top-down fusion, per-level smoothing, concatenation at stride 4, and
optional Adaptive Scale Fusion (ASF) as in MMOCR's ``FPNC`` with ``ScaleChannelSpatialAttention``.

"Real-Time Scene Text Detection with Differentiable Binarization and Adaptive Scale Fusion"
(DBNet++), https://arxiv.org/abs/2202.10304
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvModule", "ScaleChannelSpatialAttention", "FPNC"]


class ConvModule(nn.Module):
    """A convolution stored as ``.conv`` followed by an optional activation (mmcv naming).

    No normalisation: every FPNC convolution in MMOCR's DBNet/DBNet++ configs runs without one.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding: int = 0,
        bias: bool = False,
        act: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=bias)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x if self.act is None else self.act(x)


class ScaleChannelSpatialAttention(nn.Module):
    """ASF attention: (N, in, H, W) -> per-scale weights in (0, 1), (N, out, H, W).

    channel: X = F + sigmoid(conv(relu(conv(avgpool(F)))));
    spatial: X = X + sigmoid(conv1x1(relu(conv3x3(mean_c(X)))));
    A = sigmoid(conv1x1(X)).
    """

    def __init__(self, in_channels: int, c_wise_channels: int, out_channels: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.channel_wise = nn.Sequential(
            ConvModule(in_channels, c_wise_channels, 1, act=nn.ReLU()),
            ConvModule(c_wise_channels, in_channels, 1, act=nn.Sigmoid()),
        )
        self.spatial_wise = nn.Sequential(
            ConvModule(1, 1, 3, padding=1, act=nn.ReLU()),
            ConvModule(1, 1, 1, act=nn.Sigmoid()),
        )
        self.attention_wise = ConvModule(in_channels, out_channels, 1, act=nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.channel_wise(self.avg_pool(x)) + x
        out = self.spatial_wise(out.mean(dim=1, keepdim=True)) + out
        return self.attention_wise(out)


class FPNC(nn.Module):
    """FPN-style neck that concatenates all levels at the finest resolution.

    Args:
        in_channels: channels of the 4 backbone levels (strides 4, 8, 16, 32).
        lateral_channels: width of the 1x1 lateral convolutions (and of the top-down path).
        out_channels: width of each smoothed level; the output has ``4 * out_channels``.
        asf: apply Adaptive Scale Fusion (DBNet++); False gives plain DBNet's neck.

    Input: list/tuple of 4 tensors (N, in_channels[i], H_i, W_i) -> (N, 4*out_channels, H_0, W_0).
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (256, 512, 1024, 2048),
        lateral_channels: int = 256,
        out_channels: int = 64,
        asf: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = tuple(in_channels)
        self.num_levels = len(self.in_channels)
        self.lateral_channels = lateral_channels
        self.out_channels = out_channels * self.num_levels
        self.asf = asf
        self.lateral_convs = nn.ModuleList(ConvModule(c, lateral_channels, 1) for c in self.in_channels)
        self.smooth_convs = nn.ModuleList(
            ConvModule(lateral_channels, out_channels, 3, padding=1) for _ in self.in_channels
        )
        if asf:
            concat = self.out_channels
            self.asf_conv = ConvModule(concat, concat, 3, padding=1, bias=True)
            self.asf_attn = ScaleChannelSpatialAttention(concat, concat // 4, self.num_levels)

        # mmcv ConvModule init for every neck conv (the FPNC init_cfg itself matches no module).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(inputs) != self.num_levels:
            raise ValueError(f"FPNC expects {self.num_levels} feature maps, got {len(inputs)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(self.num_levels - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode="nearest"
            )
        outs = [conv(lat) for conv, lat in zip(self.smooth_convs, laterals)]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="nearest") for o in outs[1:]]
        out = torch.cat(outs, dim=1)
        if self.asf:
            attention = self.asf_attn(self.asf_conv(out))
            # ASF weights the upsampled smoothed levels, not the asf_conv output.
            out = torch.cat([attention[:, i : i + 1] * o for i, o in enumerate(outs)], dim=1)
        return out

"""FPNC neck: FPN top-down fusion, per-level smoothing, concatenation at stride 4, and
optional Adaptive Scale Fusion (ASF) as in MMOCR's ``FPNC`` with ``ScaleChannelSpatialAttention``.

"Real-Time Scene Text Detection with Differentiable Binarization and Adaptive Scale Fusion"
(DBNet++), https://arxiv.org/abs/2202.10304
"""

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dbnetpp.compile import is_compiling
from dbnetpp.ops.deform_conv import _is_channels_last

from .layers import Conv2d

__all__ = ["ConvModule", "ScaleChannelSpatialAttention", "FPNC", "UpsampledConcatConv", "upsample_factor"]


def upsample_factor(small: torch.Tensor, large: torch.Tensor) -> Optional[int]:
    """s when ``large``'s (H, W) is exactly s times ``small``'s for a power of two s >= 1, else None.

    Nearest upsampling by such an s (``F.interpolate(..., size=, mode="nearest")``) repeats every
    pixel s x s times, so it can be written as a broadcast view instead of a copy.
    """
    h, w = small.shape[-2:]
    big_h, big_w = large.shape[-2:]
    if h == 0 or w == 0 or big_h % h or big_w % w or big_h // h != big_w // w:
        return None
    s = big_h // h
    return s if s & (s - 1) == 0 else None


def _blocks(x: torch.Tensor, s: int) -> torch.Tensor:
    """(N, C, s*h, s*w) -> view (N, C, h, s, w, s): pixel (y, x) at [.., y // s, y % s, x // s, x % s]."""
    n, c, big_h, big_w = x.shape
    return x.view(n, c, big_h // s, s, big_w // s, s)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> view (N, C, h, 1, w, 1), which broadcasts against ``_blocks``."""
    n, c, h, w = x.shape
    return x.view(n, c, h, 1, w, 1)


def _add_upsampled(x: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """x + nearest-upsampled ``coarse`` (to x's size). Without autograd and with an exact
    power-of-two factor, added in place through broadcast views (no upsampled copy; not while
    compiling: the compiler fuses the functional form)."""
    s = upsample_factor(coarse, x)
    if s is None or torch.is_grad_enabled() or is_compiling():
        return x + F.interpolate(coarse, size=x.shape[2:], mode="nearest")
    _blocks(x, s).add_(_pixels(coarse))
    return x


def _concat_upsampled(levels: Sequence[torch.Tensor], weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """cat_i(weights[:, i] * nearest-upsampled levels[i]) at levels[0]'s size, along channels.

    levels: (N, C_i, H_i, W_i), levels[0] the finest; weights: None or (N, len(levels), H_0, W_0).
    Without autograd and with exact power-of-two factors, every level is written straight into
    its channel slice of the output through broadcast views (no upsampled copies, no cat; not
    while compiling: the compiler fuses the functional form).
    """
    size = levels[0].shape[2:]
    factors = [upsample_factor(level, levels[0]) for level in levels]
    if torch.is_grad_enabled() or None in factors or is_compiling():
        ups = [levels[0]] + [F.interpolate(level, size=size, mode="nearest") for level in levels[1:]]
        if weights is not None:
            ups = [weights[:, i : i + 1] * up for i, up in enumerate(ups)]
        return torch.cat(ups, dim=1)
    n = levels[0].shape[0]
    channels = [level.shape[1] for level in levels]
    first = levels[0]
    layout = torch.channels_last if _is_channels_last(first) else torch.contiguous_format
    out = torch.empty((n, sum(channels), *size), dtype=first.dtype, device=first.device, memory_format=layout)
    start = 0
    for i, (level, s) in enumerate(zip(levels, factors)):
        target = _blocks(out[:, start : start + channels[i]], s)
        if weights is None:
            target.copy_(_pixels(level).expand_as(target))
        else:
            torch.mul(_blocks(weights[:, i : i + 1], s), _pixels(level), out=target)
        start += channels[i]
    return out


class UpsampledConcatConv(nn.Module):
    """A 3x3 convolution (padding 1, stride 1) of the channel concatenation of nearest-upsampled
    levels, computed at each level's own resolution (an inference speed-up; no parameters).

    conv(up_s(x)) for nearest upsampling by s equals a transposed convolution of x with stride
    s, padding 1 and an (s+2) x (s+2) kernel: K[k] = sum over taps t of W[t] for which the tap
    lands on the same source pixel, 0 <= k + t - 2 < s (per axis). So
    ``conv(cat(x_0, up_2(x_1), up_4(x_2), ...)) = conv_0(x_0) + sum_i convT_i(x_i)`` with the
    weight split by input channels. For DBNet++'s ASF conv (256 -> 256 at stride 4 of a
    1024x1824 input) this is 64 instead of 138 GFLOP.

    Args:
        weight: (O, sum(channels), 3, 3) weight of the convolution (stride 1, padding 1) to reproduce.
        bias: (O,) or None.
        channels: input channels of each level, in concatenation order.
        factors: upsampling factor of each level (1 for the first: the output size is its size).

    forward(levels) takes the levels (N, channels[i], H_0 / factors[i], W_0 / factors[i]) and
    returns the conv's output (N, O, H_0, W_0); ``accepts(levels)`` tells whether the sizes are
    the exact multiples this needs (otherwise upsample, concatenate and use the conv itself).
    ``from_conv`` builds one from an ``nn.Conv2d``.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        channels: Sequence[int],
        factors: Sequence[int],
    ) -> None:
        super().__init__()
        if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
            raise ValueError(f"UpsampledConcatConv needs a 3x3 conv weight, got shape {tuple(weight.shape)}")
        if sum(channels) != weight.shape[1] or len(channels) != len(factors) or factors[0] != 1:
            raise ValueError(
                f"channels {list(channels)} must sum to the conv's {weight.shape[1]} inputs and factors "
                f"{list(factors)} must start with 1, one per level"
            )
        self.channels = tuple(int(c) for c in channels)
        self.factors = tuple(int(s) for s in factors)
        parts = torch.split(weight.detach(), self.channels, dim=1)
        self.register_buffer("weight0", parts[0].clone(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        for i, (part, s) in enumerate(zip(parts[1:], self.factors[1:]), start=1):
            self.register_buffer(f"kernel{i}", self.transposed_kernel(part, s), persistent=False)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, channels: Sequence[int], factors: Sequence[int]) -> "UpsampledConcatConv":
        """From a 3x3, stride 1, padding 1, dilation 1, ungrouped ``nn.Conv2d``."""
        if (
            tuple(conv.kernel_size) != (3, 3)
            or tuple(conv.stride) != (1, 1)
            or tuple(conv.padding) != (1, 1)
            or tuple(conv.dilation) != (1, 1)
            or conv.groups != 1
        ):
            raise ValueError(f"UpsampledConcatConv needs a 3x3 conv with stride 1, padding 1, got {conv}")
        return cls(conv.weight, conv.bias, channels, factors)

    @staticmethod
    def transposed_kernel(weight: torch.Tensor, s: int) -> torch.Tensor:
        """(O, C, 3, 3) conv weight -> (C, O, s+2, s+2) weight of conv_transpose2d(stride s, padding 1)."""
        k = torch.arange(s + 2, device=weight.device).view(-1, 1)
        t = torch.arange(3, device=weight.device).view(1, -1)
        hit = ((k + t - 2 >= 0) & (k + t - 2 < s)).to(torch.float64)  # (s+2, 3): kernel row k takes tap t
        kernel = torch.einsum("ocyx,ky,lx->cokl", weight.double(), hit, hit)
        return kernel.to(weight.dtype).contiguous()

    def accepts(self, levels: Sequence[torch.Tensor]) -> bool:
        if len(levels) != len(self.channels):
            return False
        return all(
            level.shape[1] == c and upsample_factor(level, levels[0]) == s
            for level, c, s in zip(levels, self.channels, self.factors)
        )

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        if not self.accepts(levels):
            raise ValueError(
                f"levels of shapes {[tuple(level.shape) for level in levels]} do not match channels "
                f"{self.channels} with upsampling factors {self.factors}"
            )
        out = F.conv2d(levels[0], self.weight0, self.bias, padding=1)
        for i in range(1, len(levels)):
            kernel = getattr(self, f"kernel{i}")
            out += F.conv_transpose2d(levels[i], kernel, stride=self.factors[i], padding=1)
        return out


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
        self.conv = Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=bias)
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
        pooled = self.channel_wise(self.avg_pool(x))  # (N, C, 1, 1)
        if not torch.is_grad_enabled():
            return self._forward_projected(x, pooled)
        out = pooled + x
        out = self.spatial_wise(out.mean(dim=1, keepdim=True)) + out
        return self.attention_wise(out)

    def _forward_projected(self, x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The same without the two full-size sums (inference): everything after ``pooled`` is
        linear in X up to the spatial branch, so with W the attention conv's (A, C) weight,
        W(x + p + s) = Wx + Wp + s * W1 and mean_c(x + p) = mean_c(x) + mean_c(p). One 1x1 conv
        of x to A + 1 channels (the last one averaging the channels) replaces them."""
        conv = self.attention_wise.conv
        n, c = x.shape[:2]
        weight = conv.weight.flatten(1)  # (A, C)
        project = torch.cat([weight, weight.new_full((1, c), 1.0 / c)]).view(-1, c, 1, 1)
        projected = F.conv2d(x, project)  # (N, A + 1, H, W)
        spatial = self.spatial_wise(projected[:, -1:] + pooled.mean(dim=1, keepdim=True))  # (N, 1, H, W)
        shift = (pooled.flatten(1) @ weight.t()).view(n, -1, 1, 1)  # W p, (N, A, 1, 1)
        if conv.bias is not None:
            shift = shift + conv.bias.view(1, -1, 1, 1)
        logits = torch.addcmul(projected[:, :-1] + shift, spatial, weight.sum(1).view(1, -1, 1, 1))
        return logits if self.attention_wise.act is None else self.attention_wise.act(logits)


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
        # inference only (see ``split_for_inference``): convolutions of upsampled maps computed
        # at the maps' own resolution
        self.first_smooth_split: Optional[UpsampledConcatConv] = None
        self.asf_split: Optional[UpsampledConcatConv] = None

        # mmcv ConvModule init for every neck conv (the FPNC init_cfg itself matches no module).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def split_for_inference(self) -> None:
        """For inference: compute the convolutions that read nearest-upsampled maps at the maps'
        own resolution (``UpsampledConcatConv``) whenever the levels are exact power-of-two
        multiples of each other (always for inputs padded to a multiple of 32):

        - ``asf_conv`` on the concatenated upsampled levels (138 -> 64 GFLOP at 1024x1824);
        - the first level's smoothing conv S on lateral L(c2) + up(top-down): with a bias-free
          1x1 lateral conv, S(L c2 + up(t)) is the 3x3 conv [S L | S] of cat(c2, up(t)), so the
          256-channel stride-4 lateral map is never formed.

        Not for training: the split copies of the weights do not follow later weight changes.
        """
        lateral, smooth = self.lateral_convs[0], self.smooth_convs[0]
        if lateral.act is None and lateral.conv.bias is None and smooth.act is None:
            lateral_weight = lateral.conv.weight.detach().double().flatten(1)  # (L, C0)
            smooth_weight = smooth.conv.weight.detach().double()  # (O, L, 3, 3)
            folded = torch.einsum("olyx,lc->ocyx", smooth_weight, lateral_weight)
            weight = torch.cat([folded, smooth_weight], dim=1)  # float64 until the kernels are built
            channels = [folded.shape[1], self.lateral_channels]
            split = UpsampledConcatConv(weight, smooth.conv.bias, channels, [1, 2])
            self.first_smooth_split = split.to(smooth.conv.weight.dtype)
        if self.asf:
            channels = [self.out_channels // self.num_levels] * self.num_levels
            factors = [2**i for i in range(self.num_levels)]
            self.asf_split = UpsampledConcatConv.from_conv(self.asf_conv.conv, channels, factors)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(inputs) != self.num_levels:
            raise ValueError(f"FPNC expects {self.num_levels} feature maps, got {len(inputs)}")
        split = not torch.is_grad_enabled()  # the inference-only paths of split_for_inference
        laterals: List[torch.Tensor] = [inputs[0]] + [conv(x) for conv, x in zip(self.lateral_convs[1:], inputs[1:])]
        for i in range(self.num_levels - 1, 1, -1):
            laterals[i - 1] = _add_upsampled(laterals[i - 1], laterals[i])
        first = self.first_smooth_split
        if split and first is not None and first.accepts(laterals[:2]):
            finest = first(laterals[:2])
        else:
            lateral = self.lateral_convs[0](inputs[0])
            finest = self.smooth_convs[0](_add_upsampled(lateral, laterals[1]) if self.num_levels > 1 else lateral)
        levels = [finest] + [conv(lat) for conv, lat in zip(self.smooth_convs[1:], laterals[1:])]
        if not self.asf:
            return _concat_upsampled(levels)
        if split and self.asf_split is not None and self.asf_split.accepts(levels):
            feature = self.asf_split(levels)
        else:
            feature = self.asf_conv(_concat_upsampled(levels))
        # ASF weights the upsampled smoothed levels, not the asf_conv output.
        return _concat_upsampled(levels, self.asf_attn(feature))

"""Modulated deformable convolution (DCNv2) operator.

Offset layout and boundary rule are torchvision's (= mmcv's): for tap k = i*kw + j of offset
group g, offset channel 2*(g*kh*kw + k) is dy and the next one dx, mask channel g*kh*kw + k.
This is mmcv's ``modulated_deform_conv`` rule (forward and backward) for every implementation.
The tap samples the input at (oy*stride - pad + i*dil + dy, ox*stride - pad + j*dil + dx)
(y, x in input pixels); a sample point with y <= -1, y >= H, x <= -1 or x >= W reads 0,
otherwise it is bilinear over its 4 neighbours, neighbours outside the image reading 0; the
offset gradient of a point that reads 0 is 0 (also at exactly -1).

Two implementations:

- ``"torchvision"``: ``torchvision.ops.deform_conv2d`` (also what ONNX export understands). Its
  offset gradient differs from mmcv's at sample coordinates of exactly -1 (mmcv: 0, as for
  every point that reads 0; torchvision: the one-sided derivative). Zero-initialised offsets
  put every border tap of a padding-1 conv there, so when the offset needs a gradient a
  device-agnostic correction node (``_BorderOffsetGrad``) adds the difference in the backward
  pass, visiting only those taps (about 1 % of the layer's CPU forward + backward time at
  2x128x80x80; on a GPU two host syncs and ~20 small kernels per layer and backward).
- ``"fast"``: plain PyTorch ops. The input is viewed as a (N*H*W*dg, C/dg) table of channel
  vectors (free for channels_last input); every (output pixel, tap, group) is one
  ``embedding_bag`` of its 4 bilinear corners with the mask folded into the corner weights,
  which writes the im2col rows (P, kh*kw*C) directly, and one matmul with the weight follows.
  Both run over chunks of output pixels so the im2col buffer stays in cache. The backward
  (``_FastDeformConv``) recomputes the chunks instead of keeping them (training memory about
  that of a plain convolution); offset and mask gradients are dot products of the column
  gradient with weighted corner sums (again ``embedding_bag``), the input gradient is the
  transposed gather (corner entries sorted by input pixel, one weighted ``embedding_bag`` per
  pixel). Single-threaded on the 2-core AVX2 CPU, the 13 DBNet++ DCN layers take about 3x
  less time than torchvision's kernel in inference at 1x3x1024x1824 and 5x less in forward +
  backward at 2x3x640x640 (``benchmarks/dcn.py``); channels_last input saves two transposes.

``"auto"`` is ``"fast"`` on the CPU and ``"torchvision"`` elsewhere (not measured on GPUs).
"""

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d as tv_deform_conv2d

__all__ = ["IMPLS", "modulated_deform_conv2d", "resolve_impl"]

IMPLS = ("auto", "torchvision", "fast")

# Target size of one im2col chunk of the fast path, per thread: small enough to stay in cache
# between the gather that writes it and the matmul that reads it, large enough that the
# per-chunk parallel regions stay few (they cost much more when the cores are shared).
CHUNK_BYTES = 4 << 20
MIN_CHUNK_ROWS = 64

IntPair = Union[int, Sequence[int]]


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation ``impl`` stands for on ``device`` ("auto" -> "fast" on CPU, else "torchvision")."""
    if impl not in IMPLS:
        raise ValueError(f"unknown deformable-conv implementation {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return "fast" if device.type == "cpu" else "torchvision"
    return impl


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _check_shapes(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
) -> None:
    if x.dim() != 4:
        raise ValueError(f"deform conv: input must be (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"deform conv: weight must be (O, C, kh, kw), got shape {tuple(weight.shape)}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"deform conv: bad stride {stride}, padding {padding} or dilation {dilation}")
    n, c, h, w = x.shape
    o, cw, kh, kw = weight.shape
    if cw == 0 or c % cw != 0:
        raise ValueError(f"deform conv: input has {c} channels, weight {tuple(weight.shape)} expects a divisor of it")
    ho = _out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = _out_size(w, kw, stride[1], padding[1], dilation[1])
    k = kh * kw
    if offset.dim() != 4 or offset.shape[0] != n or offset.shape[2:] != (ho, wo) or offset.shape[1] % (2 * k) != 0:
        raise ValueError(
            f"deform conv: offset must be (N={n}, 2*deform_groups*{k}, Ho={ho}, Wo={wo}) for input "
            f"{tuple(x.shape)} and weight {tuple(weight.shape)}, got {tuple(offset.shape)}"
        )
    dg = offset.shape[1] // (2 * k)
    if dg == 0 or c % dg != 0:
        raise ValueError(f"deform conv: {c} input channels are not divisible by deform_groups={dg}")
    if mask is not None and tuple(mask.shape) != (n, dg * k, ho, wo):
        raise ValueError(f"deform conv: mask must be {(n, dg * k, ho, wo)}, got {tuple(mask.shape)}")
    if bias is not None and tuple(bias.shape) != (o,):
        raise ValueError(f"deform conv: bias must be ({o},), got {tuple(bias.shape)}")


def modulated_deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = (1, 1),
    padding: IntPair = (1, 1),
    dilation: IntPair = (1, 1),
    impl: str = "auto",
) -> torch.Tensor:
    """Modulated deformable convolution.

    Args:
        x: input (N, C, H, W).
        offset: (N, 2*dg*kh*kw, Ho, Wo) sampling offsets in input pixels, (dy, dx) pairs per tap.
        mask: (N, dg*kh*kw, Ho, Wo) modulation (DCNv2), or None (DCNv1).
        weight: (O, C, kh, kw) (torchvision also accepts weight groups: (O, C/groups, kh, kw)).
        bias: (O,) or None.
        stride, padding, dilation: int or (h, w) pair.
        impl: "auto", "torchvision" or "fast" (see the module docstring).

    Returns (N, O, Ho, Wo), in channels_last memory format if x is (as convolutions do).
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    _check_shapes(x, offset, mask, weight, bias, stride, padding, dilation)
    impl = resolve_impl(impl, x.device)
    grouped = weight.shape[1] != x.shape[1]
    if impl == "fast" and grouped:
        raise NotImplementedError("the 'fast' deformable conv has no weight groups; use impl='torchvision'")
    if impl == "torchvision" or grouped:
        out = tv_deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask)
        if offset.requires_grad and torch.is_grad_enabled() and not _exporting():
            # torchvision's offset gradient differs from mmcv's at sample coordinates of exactly -1;
            # this identity node adds the difference in the backward pass (see _BorderOffsetGrad)
            out = _BorderOffsetGrad.apply(out, x, offset, mask, weight, stride, padding, dilation)
        return out

    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    args = [t if t is None or t.dtype == dtype else t.to(dtype) for t in (x, offset, mask, weight, bias)]
    with torch.autocast(x.device.type, enabled=False):
        out = _FastDeformConv.apply(*args, stride, padding, dilation)
    return out if out.dtype == x.dtype else out.to(x.dtype)


# --- torchvision path: mmcv's offset gradient at coordinate -1 ------------------------------------


def _exporting() -> bool:
    """True while torch.onnx / torch.export trace the model (the correction node is training-only)."""
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return True
    compiler = getattr(torch, "compiler", None)
    is_exporting = getattr(compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def _sample_row_or_column(
    x: torch.Tensor, n_idx: torch.Tensor, coord: torch.Tensor, fixed: int, along_x: bool
) -> torch.Tensor:
    """Bilinear samples (A, C) of image row ``fixed`` at columns ``coord`` (along_x) or of
    column ``fixed`` at rows ``coord``, with the DCN boundary rule (0 outside (-1, size))."""
    size = x.shape[3] if along_x else x.shape[2]
    line = x[n_idx, :, fixed, :] if along_x else x[n_idx, :, :, fixed]  # (A, C, size)
    inside = (coord > -1) & (coord < size)
    coord = torch.where(inside, coord, torch.zeros_like(coord))
    low = coord.floor()
    frac = (coord - low).unsqueeze(1)
    low = low.long()
    w_low = torch.where((inside & (low >= 0)).unsqueeze(1), 1 - frac, torch.zeros_like(frac))
    w_high = torch.where((inside & (low < size - 1)).unsqueeze(1), frac, torch.zeros_like(frac))
    c = line.shape[1]
    v_low = line.gather(2, low.clamp(min=0).view(-1, 1, 1).expand(-1, c, 1)).squeeze(2)
    v_high = line.gather(2, (low + 1).clamp(max=size - 1).view(-1, 1, 1).expand(-1, c, 1)).squeeze(2)
    return w_low * v_low + w_high * v_high


class _BorderOffsetGrad(torch.autograd.Function):
    """Identity on the torchvision output whose backward adds (mmcv - torchvision) to the offset
    gradient.

    mmcv (``dmcn_get_coordinate_weight``) gives a zero offset gradient for a sample point with
    y <= -1 or x <= -1 (it reads 0 there). torchvision's kernel differentiates the bilinear
    interpolation from the right at exactly y = -1: d/dy = the sample of row 0 at x (and at
    x = -1, d/dx = the sample of column 0 at y). Everything else (output, input, mask and weight
    gradients, the offset gradient elsewhere) already agrees. Zero-initialised offsets put every
    border tap of a padding-1 conv at exactly -1, so this matters at the start of training.
    The correction visits only the taps at exactly -1 (a sparse set: O(border) per image).
    """

    @staticmethod
    def forward(ctx, out, x, offset, mask, weight, stride, padding, dilation):  # type: ignore[override]
        ctx.save_for_backward(x, offset, mask, weight)
        ctx.conv = (stride, padding, dilation)
        return out.view_as(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, offset, mask, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        grad_offset = _offset_grad_correction(grad_out, x, offset, mask, weight, stride, padding, dilation)
        return grad_out, None, grad_offset, None, None, None, None, None


def _offset_grad_correction(grad_out, x, offset, mask, weight, stride, padding, dilation) -> torch.Tensor:
    """(mmcv - torchvision) offset gradient, shaped like ``offset`` (non-zero only at taps with a
    sample coordinate of exactly -1)."""
    n, c, h, w = x.shape
    o, cw, kh, kw = weight.shape
    k = kh * kw
    dg = offset.shape[1] // (2 * k)
    ho, wo = offset.shape[2:]
    dt = torch.promote_types(offset.dtype, torch.float32)
    dev = offset.device
    off = offset.detach().reshape(n, dg, k, 2, ho, wo)
    tap_y = torch.arange(kh, device=dev).repeat_interleave(kw) * dilation[0]
    tap_x = torch.arange(kw, device=dev).repeat(kh) * dilation[1]
    out_y = torch.arange(ho, device=dev) * stride[0] - padding[0]
    out_x = torch.arange(wo, device=dev) * stride[1] - padding[1]
    # sample coordinates (N, dg, K, Ho, Wo), computed as the kernels do: integer base + offset
    y = off[:, :, :, 0] + (tap_y.view(k, 1, 1) + out_y.view(1, ho, 1)).to(offset.dtype)
    xs = off[:, :, :, 1] + (tap_x.view(k, 1, 1) + out_x.view(1, 1, wo)).to(offset.dtype)
    correction = torch.zeros(n, dg, k, 2, ho, wo, dtype=dt, device=dev)
    hit = torch.stack((y == -1, xs == -1), dim=3)  # (N, dg, K, 2, Ho, Wo)
    idx = hit.nonzero()
    if idx.shape[0] == 0:
        return correction.to(offset.dtype).view(offset.shape)
    ni, gi, ki, di, oy, ox = idx.unbind(1)
    # column gradient at each hit tap: sum_o weight[o, c, k] * grad_out[n, o, oy, ox], for the
    # input channels c of deform group g (weight groups: only the output channels reading c)
    groups = c // cw
    opg = o // groups
    cg = c // dg
    order = torch.argsort(ki)  # one small matmul per tap k with that tap's weight slice
    counts = torch.bincount(ki, minlength=k).tolist()
    go = grad_out.to(dt)[ni[order], :, oy[order], ox[order]].view(-1, groups, opg)  # (A, groups, O/groups)
    wk = weight.detach().to(dt).reshape(groups, opg, cw, k)
    col = torch.empty(idx.shape[0], groups, cw, dtype=dt, device=dev)
    start = 0
    for tap, count in enumerate(counts):
        if count:
            rows = order[start : start + count]
            col[rows] = torch.einsum("agp,gpc->agc", go[start : start + count], wk[..., tap])
            start += count
    col = col.view(-1, c)  # (A, C)
    chan = gi.view(-1, 1) * cg + torch.arange(cg, device=dev).view(1, -1)  # (A, C/dg)
    col = col.gather(1, chan)
    xd = x.detach().to(dt)
    # y == -1 (di == 0): torchvision's d/dy is the sample of row 0 at x; x == -1: column 0 at y
    coord_other = torch.where(di == 0, xs[ni, gi, ki, oy, ox], y[ni, gi, ki, oy, ox]).to(dt)
    along_x = di == 0
    samples = torch.empty(idx.shape[0], c, dtype=dt, device=dev)
    samples[along_x] = _sample_row_or_column(xd, ni[along_x], coord_other[along_x], 0, True)
    samples[~along_x] = _sample_row_or_column(xd, ni[~along_x], coord_other[~along_x], 0, False)
    samples = samples.gather(1, chan)
    value = (col * samples).sum(1)
    if mask is not None:
        value = value * mask.detach().to(dt).reshape(n, dg, k, ho, wo)[ni, gi, ki, oy, ox]
    correction[ni, gi, ki, di, oy, ox] = -value
    return correction.to(offset.dtype).view(offset.shape)


# --- fast path ------------------------------------------------------------------------------------


class _Sampling:
    """Bilinear sampling plan of every (output pixel, tap, group), shared by forward and backward.

    ``idx`` (P, K*dg*4) int64: rows of the (N*H*W*dg, C/dg) input table holding the 4 corners
    (y0x0, y0x1, y1x0, y1x1; clamped into the image, out-of-image corners have weight 0);
    ``bil`` (P, K*dg*4): bilinear corner weights (0 for corners outside the image);
    ``weights``: ``bil`` times the mask. P = N*Ho*Wo in (n, oy, ox) order, then (tap, group).
    """

    def __init__(
        self,
        offset: torch.Tensor,
        mask: Optional[torch.Tensor],
        height: int,
        width: int,
        kernel: Tuple[int, int],
        stride: Tuple[int, int],
        padding: Tuple[int, int],
        dilation: Tuple[int, int],
    ) -> None:
        n, _, ho, wo = offset.shape
        kh, kw = kernel
        k = kh * kw
        dg = offset.shape[1] // (2 * k)
        dev, dt = offset.device, offset.dtype
        off = offset.reshape(n, dg, k, 2, ho, wo)
        # tap grid: (Ho, 1, K, 1) and (1, Wo, K, 1) against offsets laid out as (N, Ho, Wo, K, dg)
        tap_y = torch.arange(kh, device=dev, dtype=dt).repeat_interleave(kw) * dilation[0]
        tap_x = torch.arange(kw, device=dev, dtype=dt).repeat(kh) * dilation[1]
        out_y = torch.arange(ho, device=dev, dtype=dt) * stride[0] - padding[0]
        out_x = torch.arange(wo, device=dev, dtype=dt) * stride[1] - padding[1]
        y = off[:, :, :, 0].permute(0, 3, 4, 2, 1) + (out_y.view(ho, 1, 1, 1) + tap_y.view(1, 1, k, 1))
        x = off[:, :, :, 1].permute(0, 3, 4, 2, 1) + (out_x.view(1, wo, 1, 1) + tap_x.view(1, 1, k, 1))
        inside = (y > -1) & (y < height) & (x > -1) & (x < width)  # False for NaN too
        y = torch.where(inside, y, 0)  # keeps inf/NaN offsets out of the weights
        x = torch.where(inside, x, 0)
        y0 = y.floor()
        x0 = x.floor()
        ly = y - y0
        lx = x - x0
        y0 = y0.long()
        x0 = x0.long()
        # per-corner validity (bool); all False where the point itself is outside
        self.vy0 = inside & (y0 >= 0)
        self.vy1 = inside & (y0 < height - 1)
        self.vx0 = inside & (x0 >= 0)
        self.vx1 = inside & (x0 < width - 1)
        # 1-D bilinear weights of the low / high row and column, 0 outside the image
        self.wy0 = torch.where(self.vy0, 1 - ly, 0)
        self.wy1 = torch.where(self.vy1, ly, 0)
        self.wx0 = torch.where(self.vx0, 1 - lx, 0)
        self.wx1 = torch.where(self.vx1, lx, 0)
        bil = torch.stack(
            (self.wy0 * self.wx0, self.wy0 * self.wx1, self.wy1 * self.wx0, self.wy1 * self.wx1), dim=-1
        )  # (N, Ho, Wo, K, dg, 4)
        self.mask = None
        if mask is not None:
            self.mask = mask.reshape(n, dg, k, ho, wo).permute(0, 3, 4, 2, 1)
            weights = bil * self.mask.unsqueeze(-1)
        else:
            weights = bil

        # corner rows of the table; out-of-image corners are clamped in (their weight is 0)
        image = torch.arange(n, device=dev).view(n, 1, 1, 1, 1) * (height * width)
        row1 = (y0 + 1).clamp_(max=height - 1).mul_(width).add_(image)  # y0 >= -1 here
        row0 = y0.clamp_(min=0).mul_(width).add_(image)
        x1 = (x0 + 1).clamp_(max=width - 1)
        x0 = x0.clamp_(min=0)
        idx = torch.stack((row0 + x0, row0 + x1, row1 + x0, row1 + x1), dim=-1)
        if dg > 1:
            idx = idx.mul_(dg).add_(torch.arange(dg, device=dev).view(dg, 1))
        p = n * ho * wo
        self.shape = (n, ho, wo, k, dg)
        self.idx = idx.view(p, k * dg * 4)
        self.bil = bil.view(p, k * dg * 4)
        self.weights = weights.reshape(p, k * dg * 4)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _input_table(x: torch.Tensor, dg: int) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W*dg, C/dg) channel vectors (a view when x is channels_last)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).contiguous().view(n * h * w * dg, c // dg)


def _chunks(p: int, row_elems: int, elem_size: int) -> List[Tuple[int, int]]:
    budget = CHUNK_BYTES * (torch.get_num_threads() if torch.get_num_threads() > 0 else 1)
    rows = max(MIN_CHUNK_ROWS, budget // max(1, row_elems * elem_size))
    return [(s, min(p, s + rows)) for s in range(0, p, rows)]


def _im2col(table: torch.Tensor, plan: _Sampling, start: int, end: int) -> torch.Tensor:
    """Sampled, modulated input columns of output pixels [start, end): (end-start, K*C)."""
    cols = F.embedding_bag(
        plan.idx[start:end].reshape(-1, 4),
        table,
        per_sample_weights=plan.weights[start:end].reshape(-1, 4),
        mode="sum",
    )
    return cols.view(end - start, -1)


def _scatter_add_corners(grad_table: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, grad_cols: torch.Tensor):
    """grad_table[idx[4b + c]] += weights[4b + c] * grad_cols[b] for every bag b and corner c.

    Transposed gather: the corner entries are sorted by table row, each distinct row becomes
    one weighted ``embedding_bag`` over ``grad_cols``, and only the distinct rows are added.
    Far faster than ``index_add_`` of a 4x expanded, weighted copy of ``grad_cols``.
    """
    rows, order = torch.sort(idx)
    uniq, counts = torch.unique_consecutive(rows, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    summed = F.embedding_bag(
        torch.div(order, 4, rounding_mode="floor"), grad_cols, starts, mode="sum", per_sample_weights=weights[order]
    )
    grad_table.index_add_(0, uniq, summed)


class _FastDeformConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, offset, mask, weight, bias, stride, padding, dilation):  # type: ignore[override]
        n, c, h, w = x.shape
        o, _, kh, kw = weight.shape
        k = kh * kw
        dg = offset.shape[1] // (2 * k)
        ho, wo = offset.shape[2:]
        p = n * ho * wo
        out = x.new_empty(p, o)
        if p > 0 and c > 0:
            plan = _Sampling(offset, mask, h, w, (kh, kw), stride, padding, dilation)
            table = _input_table(x, dg)
            wmat_t = weight.permute(0, 2, 3, 1).reshape(o, k * c).t()  # (K*C, O), rows in (tap, channel) order
            for s, e in _chunks(p, k * c, x.element_size()):
                cols = _im2col(table, plan, s, e)
                if bias is None:
                    torch.mm(cols, wmat_t, out=out[s:e])
                else:
                    torch.addmm(bias, cols, wmat_t, out=out[s:e])
        elif bias is not None:
            out.copy_(bias.expand(p, o))
        else:
            out.zero_()
        ctx.save_for_backward(x, offset, mask, weight)
        ctx.has_bias = bias is not None
        ctx.conv = (stride, padding, dilation)
        out = out.view(n, ho, wo, o).permute(0, 3, 1, 2)
        # like a convolution, keep the input's memory format (mixed layouts slow the next layers)
        return out if _is_channels_last(x) else out.contiguous()

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, offset, mask, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        need_x, need_offset, need_mask, need_weight, need_bias = ctx.needs_input_grad[:5]
        n, c, h, w = x.shape
        o, _, kh, kw = weight.shape
        k = kh * kw
        dg = offset.shape[1] // (2 * k)
        cg = c // dg
        ho, wo = offset.shape[2:]
        p = n * ho * wo
        g = grad_out.permute(0, 2, 3, 1).contiguous().view(p, o)

        grad_bias = g.sum(0) if (ctx.has_bias and need_bias) else None
        grad_x = grad_offset = grad_mask = grad_weight = None
        if p == 0 or c == 0 or not (need_x or need_offset or need_mask or need_weight):
            if need_x:
                grad_x = torch.zeros_like(x)
            if need_offset:
                grad_offset = torch.zeros_like(offset)
            if need_mask:
                grad_mask = torch.zeros_like(mask)
            if need_weight:
                grad_weight = torch.zeros_like(weight)
            return grad_x, grad_offset, grad_mask, grad_weight, grad_bias, None, None, None

        plan = _Sampling(offset, mask, h, w, (kh, kw), stride, padding, dilation)
        table = _input_table(x, dg)
        wmat = weight.permute(0, 2, 3, 1).reshape(o, k * c)
        grad_wmat = torch.zeros_like(wmat) if need_weight else None
        grad_table = torch.zeros_like(table) if need_x else None
        # The offset and mask gradients of a sample are dot products of its column gradient with
        # fixed combinations of its 4 corner vectors: d(sample)/dy, d(sample)/dx and the unmasked
        # sample. Each combination is one weighted embedding_bag (corner coefficients below).
        combos = []
        if need_offset:
            m = plan.mask.unsqueeze(-1) if plan.mask is not None else 1.0
            vy0, vy1, vx0, vx1 = (v.to(offset.dtype) for v in (plan.vy0, plan.vy1, plan.vx0, plan.vx1))
            wy0, wy1, wx0, wx1 = plan.wy0, plan.wy1, plan.wx0, plan.wx1
            # derivatives of the corner weights (y0x0, y0x1, y1x0, y1x1) along y and x
            dy = torch.stack((-vy0 * wx0, -vy0 * wx1, vy1 * wx0, vy1 * wx1), -1)
            dx = torch.stack((-vx0 * wy0, vx1 * wy0, -vx0 * wy1, vx1 * wy1), -1)
            combos += [(dy * m).view(p, -1), (dx * m).view(p, -1)]
        if need_mask:
            combos.append(plan.bil)
        combo_grads = [offset.new_empty(p, k * dg) for _ in combos]
        for s, e in _chunks(p, k * c, x.element_size()):
            gs = g[s:e]
            if need_weight:
                grad_wmat.addmm_(gs.t(), _im2col(table, plan, s, e))
            if not (need_x or combos):
                continue
            grad_cols = torch.mm(gs, wmat).view(-1, cg)  # ((e-s)*K*dg, C/dg)
            idx = plan.idx[s:e].reshape(-1, 4)
            for coef, out in zip(combos, combo_grads):
                sampled = F.embedding_bag(idx, table, per_sample_weights=coef[s:e].reshape(-1, 4), mode="sum")
                out[s:e] = torch.linalg.vecdot(sampled, grad_cols).view(e - s, -1)
            if need_x:
                _scatter_add_corners(grad_table, idx.view(-1), plan.weights[s:e].reshape(-1), grad_cols)

        if need_x:
            grad_x = grad_table.view(n, h, w, c).permute(0, 3, 1, 2)
            grad_x = grad_x if _is_channels_last(x) else grad_x.contiguous()
        if need_weight:
            grad_weight = grad_wmat.view(o, kh, kw, c).permute(0, 3, 1, 2).contiguous()
        if need_offset:
            gy, gx = (t.view(n, ho, wo, k, dg) for t in combo_grads[:2])
            # (N, Ho, Wo, K, dg, 2) -> (N, dg, K, 2, Ho, Wo)
            grad_offset = torch.stack((gy, gx), dim=-1).permute(0, 4, 3, 5, 1, 2).reshape(offset.shape)
        if need_mask:
            gm = combo_grads[-1].view(n, ho, wo, k, dg)
            grad_mask = gm.permute(0, 4, 3, 1, 2).reshape(mask.shape)
        return grad_x, grad_offset, grad_mask, grad_weight, grad_bias, None, None, None

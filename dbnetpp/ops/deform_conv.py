"""Modulated deformable convolution (DCNv2) operator.

Offset layout and boundary rule are torchvision's (= mmcv's): for tap k = i*kw + j of offset
group g, offset channel 2*(g*kh*kw + k) is dy and the next one dx, mask channel g*kh*kw + k.
This is mmcv's ``modulated_deform_conv`` rule (forward and backward) for every implementation.
The tap samples the input at (oy*stride - pad + i*dil + dy, ox*stride - pad + j*dil + dx)
(y, x in input pixels); a sample point with y <= -1, y >= H, x <= -1 or x >= W reads 0,
otherwise it is bilinear over its 4 neighbours, neighbours outside the image reading 0; the
offset gradient of a point that reads 0 is 0 (also at exactly -1).

Two implementations:

- ``"torchvision"``: ``torchvision.ops.deform_conv2d``'s kernels (forward and backward). Its
  backward differs from mmcv's at sample coordinates of exactly -1 (mmcv: offset gradient 0, as
  for every point that reads 0; torchvision: the one-sided derivative). Zero-initialised offsets
  put every border tap of a padding-1 conv there, so the backward hands torchvision's kernel
  the offsets with those coordinates moved to -2, where its rule gives mmcv's 0 and every other
  gradient is unchanged: one elementwise pass, no data-dependent shapes, no host sync.
- ``"fast"``: plain PyTorch ops. The input is viewed as a (N*H*W*dg, C/dg) table of channel
  vectors (free for channels_last input); every (output pixel, tap, group) is one
  ``embedding_bag`` of its 4 bilinear corners with the mask folded into the corner weights,
  which writes the im2col rows (P, kh*kw*C) directly, and one matmul with the weight follows.
  Both run over chunks of output pixels so the im2col buffer stays in cache. The backward
  (``_fast_backward``) recomputes the chunks instead of keeping them (training memory about
  that of a plain convolution); offset and mask gradients are dot products of the column
  gradient with weighted corner sums (again ``embedding_bag``), the input gradient is the
  transposed gather (corner entries sorted by input pixel, one weighted ``embedding_bag`` per
  pixel). Single-threaded on the 2-core AVX2 CPU, the 13 DBNet++ DCN layers take about 3x
  less time than torchvision's kernel in inference at 1x3x1024x1824 and 5x less in forward +
  backward at 2x3x640x640 (``benchmarks/dcn.py``); channels_last input saves two transposes.
  Off the CPU every intermediate size follows from the shapes alone (no ``nonzero``, ``unique`` or
  ``.item()``), so it never asks the device for a value; on the CPU the input-gradient scatter
  reads its number of distinct rows (``unique_consecutive``), which costs nothing there
  (``_scatter_add_corners``).

``"auto"`` is ``"fast"`` on the CPU and ``"torchvision"`` elsewhere (not measured on GPUs).

Both sit beneath one PyTorch operator, ``torch.ops.dbnetpp.modulated_deform_conv2d`` (torch >=
2.4, ``custom_op`` of ``torch.library``), with a fake (shape-only) implementation and a registered
autograd formula whose backward is again one operator,
``torch.ops.dbnetpp.modulated_deform_conv2d_backward``. ``torch.compile`` and ``torch.export``
see each DCN layer as one node (forward) and one node (backward), FakeTensor / meta tracing
needs no data, and nothing inside asks the device for a value. On older torch the same forward
and backward run through an ``autograd.Function``.
"""

import contextlib
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from dbnetpp.ops import exact_strides_options

__all__ = ["IMPLS", "modulated_deform_conv2d", "resolve_impl", "torchvision_graph"]

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
    Computes in float32 (float64 for float64 input) and returns x's dtype, also under autocast.
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    _check_shapes(x, offset, mask, weight, bias, stride, padding, dilation)
    impl = resolve_impl(impl, x.device)
    grouped = weight.shape[1] != x.shape[1]
    if impl == "fast" and grouped:
        raise NotImplementedError("the 'fast' deformable conv has no weight groups; use impl='torchvision'")
    if grouped:
        impl = "torchvision"
    if impl == "torchvision" and _TORCHVISION_GRAPH:
        # export_onnx: torchvision's operator, which the ONNX exporter turns into DeformConv
        return tv_deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask)

    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    args = [t if t is None or t.dtype == dtype else t.to(dtype) for t in (x, offset, mask, weight, bias)]
    if _OP is not None:
        out = _OP(*args, list(stride), list(padding), list(dilation), impl)
    else:  # torch < 2.4: the same forward and backward through an autograd.Function
        out = _DeformConvFunction.apply(*args, stride, padding, dilation, impl)
    return out if out.dtype == x.dtype else out.to(x.dtype)


_TORCHVISION_GRAPH = False


@contextlib.contextmanager
def torchvision_graph() -> Iterator[None]:
    """Within this context, ``impl="torchvision"`` calls ``torchvision.ops.deform_conv2d`` itself
    instead of the ``dbnetpp::modulated_deform_conv2d`` operator: the graph ONNX exporters
    translate to ``DeformConv`` (forward only; torchvision's own offset gradient at -1)."""
    global _TORCHVISION_GRAPH
    previous = _TORCHVISION_GRAPH
    _TORCHVISION_GRAPH = True
    try:
        yield
    finally:
        _TORCHVISION_GRAPH = previous


# --- the operator: forward and backward of both implementations ----------------------------------


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if _is_channels_last(x) else torch.contiguous_format


def _output_shape(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor) -> Tuple[int, int, int, int]:
    return (x.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])


def _forward_impl(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    impl: str,
) -> torch.Tensor:
    """(N, O, Ho, Wo) in x's memory format (the layout the fake implementation promises)."""
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    with torch.autocast(x.device.type, enabled=False):
        if impl == "torchvision":
            out = tv_deform_conv2d(
                x, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask
            )
        elif impl == "fast":
            out = _fast_forward(x, offset, mask, weight, bias, stride, padding, dilation)
        else:
            raise ValueError(f"deform conv operator: impl must be 'torchvision' or 'fast', got {impl!r}")
    return out.contiguous(memory_format=_memory_format(x))


def _mmcv_border_offset(
    offset: torch.Tensor,
    kernel: Tuple[int, int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    """``offset`` with every sample coordinate of exactly -1 moved to -2 (same shape).

    torchvision's backward differentiates the bilinear form from the right at y = -1 (and x = -1);
    mmcv gives 0 there, as for every point that reads 0. At -2 torchvision gives 0 too, and
    nothing else changes: a point at -1 or -2 reads 0 and passes no gradient to the input or
    mask. Coordinates are formed as the kernels form them (integer base + offset, one rounding).
    """
    n, channels, ho, wo = offset.shape
    kh, kw = kernel
    k = kh * kw
    dg = channels // (2 * k)
    dev, dt = offset.device, offset.dtype
    off = offset.reshape(n, dg, k, 2, ho, wo)
    tap_y = torch.arange(kh, device=dev).repeat_interleave(kw) * dilation[0]
    tap_x = torch.arange(kw, device=dev).repeat(kh) * dilation[1]
    base_y = (tap_y.view(k, 1, 1) + (torch.arange(ho, device=dev) * stride[0] - padding[0]).view(1, ho, 1)).to(dt)
    base_x = (tap_x.view(k, 1, 1) + (torch.arange(wo, device=dev) * stride[1] - padding[1]).view(1, 1, wo)).to(dt)
    dy, dx = off[:, :, :, 0], off[:, :, :, 1]
    dy = torch.where(dy + base_y == -1, -2 - base_y, dy)
    dx = torch.where(dx + base_x == -1, -2 - base_x, dx)
    return torch.stack((dy, dx), dim=3).reshape(offset.shape)


def _torchvision_backward(grad_out, x, offset, mask, weight, stride, padding, dilation):
    """torchvision's backward kernel (x, offset, mask, weight gradients) with mmcv's offset
    gradient at -1: dense, no data-dependent shapes."""
    kh, kw = weight.shape[2:]
    offset = _mmcv_border_offset(offset, (kh, kw), stride, padding, dilation)
    use_mask = mask is not None
    if mask is None:
        mask = x.new_zeros(x.shape[0], 1)  # what torchvision.ops.deform_conv2d passes without a mask
    bias = x.new_zeros(weight.shape[0])
    grads = torch.ops.torchvision._deform_conv2d_backward(
        grad_out.contiguous(),
        x.contiguous(),
        weight.contiguous(),
        offset.contiguous(),
        mask.contiguous(),
        bias,
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        dilation[0],
        dilation[1],
        x.shape[1] // weight.shape[1],
        offset.shape[1] // (2 * kh * kw),
        use_mask,
    )
    grad_x, grad_weight, grad_offset, grad_mask, _ = grads
    return grad_x, grad_offset, grad_mask if use_mask else None, grad_weight


def _backward_impl(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    impl: str,
    needs: Sequence[bool],
) -> List[torch.Tensor]:
    """Gradients of (x, offset, mask, weight); an empty tensor for each one ``needs`` does not ask
    for (and for the mask when there is none). Layouts: x's memory format for the input
    gradient, contiguous for the others (as the fake implementation promises)."""
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    needs = [bool(v) for v in needs]
    needs[2] = needs[2] and mask is not None
    with torch.autocast(x.device.type, enabled=False):
        if impl == "torchvision":
            grads = _torchvision_backward(grad_out, x, offset, mask, weight, stride, padding, dilation)
        elif impl == "fast":
            grads = _fast_backward(grad_out, x, offset, mask, weight, stride, padding, dilation, needs)
        else:
            raise ValueError(f"deform conv operator: impl must be 'torchvision' or 'fast', got {impl!r}")
    formats = (_memory_format(x), torch.contiguous_format, torch.contiguous_format, torch.contiguous_format)
    return [
        g.contiguous(memory_format=f) if need else x.new_empty(0) for g, need, f in zip(grads, needs, formats)
    ]


def _fake_backward(grad_out, x, offset, mask, weight, needs) -> List[torch.Tensor]:
    """Shapes, dtypes and layouts of ``_backward_impl``'s results, computing nothing."""
    likes = (x, offset, mask, weight)
    formats = (_memory_format(x), torch.contiguous_format, torch.contiguous_format, torch.contiguous_format)
    return [
        torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=f)
        if need and t is not None
        else x.new_empty(0)
        for t, need, f in zip(likes, needs, formats)
    ]


def _save_inputs(ctx: Any, x, offset, mask, weight, bias, stride, padding, dilation, impl) -> None:
    ctx.save_for_backward(x, offset, mask, weight)
    ctx.conv = (list(stride), list(padding), list(dilation), impl)
    ctx.has_bias = bias is not None


def _input_grads(ctx: Any, grad_out: torch.Tensor, backward: Callable[..., List[torch.Tensor]]) -> Tuple:
    """(x, offset, mask, weight, bias) gradients, None where none is needed."""
    x, offset, mask, weight = ctx.saved_tensors
    stride, padding, dilation, impl = ctx.conv
    needs = list(ctx.needs_input_grad[:4])
    grads = backward(grad_out, x, offset, mask, weight, stride, padding, dilation, impl, needs)
    grads = [g if need else None for g, need in zip(grads, needs)]
    if mask is None:
        grads[2] = None
    grad_bias = grad_out.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[4] else None
    return (*grads, grad_bias)


class _DeformConvFunction(torch.autograd.Function):
    """The operator as an autograd.Function (torch < 2.4: no ``custom_op`` in ``torch.library``)."""

    @staticmethod
    def forward(ctx, x, offset, mask, weight, bias, stride, padding, dilation, impl):  # type: ignore[override]
        _save_inputs(ctx, x, offset, mask, weight, bias, stride, padding, dilation, impl)
        return _forward_impl(x, offset, mask, weight, bias, stride, padding, dilation, impl)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        return (*_input_grads(ctx, grad_out, _backward_impl), None, None, None, None)


def _register_ops() -> Optional[Callable[..., torch.Tensor]]:
    """Register ``dbnetpp::modulated_deform_conv2d`` and its backward,
    ``dbnetpp::modulated_deform_conv2d_backward``, with torch.library (torch >= 2.4); returns
    the forward operator, or None on older torch."""
    custom_op = getattr(torch.library, "custom_op", None)
    if custom_op is None:
        return None
    # The kernels pick their output layouts from their inputs' (channels_last in, channels_last
    # out), as the fake implementations do from the traced inputs: inductor must hand them inputs
    # with exactly the traced strides, not a layout of its own choosing.
    options = exact_strides_options(custom_op)

    @custom_op("dbnetpp::modulated_deform_conv2d", **options)
    def forward_op(
        x: torch.Tensor,
        offset: torch.Tensor,
        mask: Optional[torch.Tensor],
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        stride: List[int],
        padding: List[int],
        dilation: List[int],
        impl: str,
    ) -> torch.Tensor:
        return _forward_impl(x, offset, mask, weight, bias, stride, padding, dilation, impl)

    @forward_op.register_fake
    def _(x, offset, mask, weight, bias, stride, padding, dilation, impl):
        shape = _output_shape(x, offset, weight)
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))

    @custom_op("dbnetpp::modulated_deform_conv2d_backward", **options)
    def backward_op(
        grad_out: torch.Tensor,
        x: torch.Tensor,
        offset: torch.Tensor,
        mask: Optional[torch.Tensor],
        weight: torch.Tensor,
        stride: List[int],
        padding: List[int],
        dilation: List[int],
        impl: str,
        needs: List[bool],
    ) -> List[torch.Tensor]:
        return _backward_impl(grad_out, x, offset, mask, weight, stride, padding, dilation, impl, needs)

    @backward_op.register_fake
    def _(grad_out, x, offset, mask, weight, stride, padding, dilation, impl, needs):
        return _fake_backward(grad_out, x, offset, mask, weight, needs)

    def setup_context(ctx, inputs, output):
        _save_inputs(ctx, *inputs)

    def backward(ctx, grad_out):
        return (*_input_grads(ctx, grad_out, backward_op), None, None, None, None)

    forward_op.register_autograd(backward, setup_context=setup_context)
    return forward_op


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

    Transposed gather: the corner entries are sorted by table row and each row's run of entries
    becomes one weighted ``embedding_bag`` over ``grad_cols``. Far faster than ``index_add_`` of
    a 4x expanded, weighted copy of ``grad_cols``. On the CPU only the distinct rows get a bag
    (``unique_consecutive``: a size read from the values, free there); elsewhere every table row
    gets one (``searchsorted``: empty bags sum to 0), so that every size follows from the shapes
    and a GPU never waits for the device to report one.
    """
    rows, order = torch.sort(idx)
    bags = torch.div(order, 4, rounding_mode="floor")
    if grad_table.device.type == "cpu" and not _FIXED_SIZE_SCATTER:
        uniq, counts = torch.unique_consecutive(rows, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        summed = F.embedding_bag(bags, grad_cols, starts, mode="sum", per_sample_weights=weights[order])
        grad_table.index_add_(0, uniq, summed)
        return
    table_rows = torch.arange(grad_table.shape[0], device=rows.device, dtype=rows.dtype)
    starts = torch.searchsorted(rows, table_rows)
    grad_table += F.embedding_bag(bags, grad_cols, starts, mode="sum", per_sample_weights=weights[order])


# Tests set this to run the fixed-size scatter (the one used off the CPU) on the CPU.
_FIXED_SIZE_SCATTER = False


def _fast_forward(x, offset, mask, weight, bias, stride, padding, dilation) -> torch.Tensor:
    """The "fast" forward: (N, O, Ho, Wo), in x's memory format."""
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
    out = out.view(n, ho, wo, o).permute(0, 3, 1, 2)
    # like a convolution, keep the input's memory format (mixed layouts slow the next layers)
    return out if _is_channels_last(x) else out.contiguous()


def _fast_backward(grad_out, x, offset, mask, weight, stride, padding, dilation, needs):
    """The "fast" backward: gradients of (x, offset, mask, weight), None where ``needs`` is False."""
    need_x, need_offset, need_mask, need_weight = needs
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    k = kh * kw
    dg = offset.shape[1] // (2 * k)
    cg = c // dg
    ho, wo = offset.shape[2:]
    p = n * ho * wo
    g = grad_out.permute(0, 2, 3, 1).contiguous().view(p, o)

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
        return grad_x, grad_offset, grad_mask, grad_weight

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
    return grad_x, grad_offset, grad_mask, grad_weight


_OP = _register_ops()

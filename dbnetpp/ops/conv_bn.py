"""Convolution and train-mode BatchNorm as registered operators: compiled CPU training keeps eager's numbers.

A freshly initialised DBNet++ in train mode is ill-conditioned: its float32 step moves by 0.4 %
(outputs) and by tens of per cent (gradients) between two orders of summation
(``benchmarks/compile_numerics.py``). Inductor on the CPU changes two orders that matter:

- it runs every convolution channels-last (``decide_layout_opt``: oneDNN's NHWC kernels where
  eager ran the NCHW ones);
- it decomposes train-mode BatchNorm into reductions of its own.

What else it fuses (ReLU, residual sums, upsampling, the attention, the loss) stays within float32
rounding of eager. So while ``torch.compile`` traces a training step on the CPU, the library's
``Conv2d``, ``ConvTranspose2d`` and ``BatchNorm2d`` (``dbnetpp.models.layers``) call operators
that the compiler cannot look into, whose kernels are the ones eager calls, on eager's layout:

- ``torch.ops.dbnetpp.convolution``: ``aten.convolution``; its backward,
  ``torch.ops.dbnetpp.convolution_backward``, is ``aten.convolution_backward`` for the gradients
  autograd asks for;
- ``torch.ops.dbnetpp.batch_norm_train``: ``aten.native_batch_norm`` with batch statistics. It
  returns the moved running statistics, and the layer writes them into its buffers (an
  operator with a registered autograd formula may not write into its inputs). Its backward,
  ``torch.ops.dbnetpp.batch_norm_train_backward``, is ``aten.native_batch_norm_backward``.

The compiled step then stays within 1e-4 (outputs) and 1e-3 (gradients) of eager. Inductor's own
kernels put a fresh R50-DCNv2's outputs up to 11 % and its gradients a median 7-15 % off (README,
"Compiled against eager"). The price on the CPU: inductor no longer fuses BatchNorm with its
neighbours, and no convolution goes channels-last. Off the CPU (the GPUs people train on) nothing
changes and the compiler fuses as it likes. Eager mode, eval mode, ``torch.export`` and autocast
never take this path. ``set_eager_kernels(False)`` turns it off (for the next compile). Needs
torch >= 2.4 (``custom_op``); on older torch the layers are torch.nn's.
"""

from typing import Any, Dict, List, Optional

import torch

from dbnetpp.compile import is_compiling, is_exporting
from dbnetpp.ops import exact_strides_options

__all__ = ["batch_norm_train", "convolution", "eager_kernels_wanted", "set_eager_kernels"]

_ENABLED = True


def set_eager_kernels(enabled: bool) -> None:
    """Whether compiled CPU training routes convolutions and train-mode BatchNorm through the
    registered operators (default True). Takes effect at the next compile."""
    global _ENABLED
    _ENABLED = bool(enabled)


def eager_kernels_wanted(x: torch.Tensor) -> bool:
    """True while ``torch.compile`` traces CPU float work (not export, not autocast) and the
    operators exist: then the layers call them. Static under dynamo (device, dtype, flags)."""
    return (
        _ENABLED
        and _OPS is not None
        and is_compiling()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not is_exporting()
        and not torch.is_autocast_enabled(x.device.type)  # torch >= 2.4, as the operators
    )


def convolution(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    transposed: bool,
    output_padding: List[int],
    groups: int,
) -> torch.Tensor:
    """``aten.convolution`` as ``torch.ops.dbnetpp.convolution`` (one opaque node forward and
    backward). x (N, C, H, W) -> (N, O, Ho, Wo), every size in pixels as for ``F.conv2d``."""
    if _OPS is None:
        raise RuntimeError("dbnetpp.ops.conv_bn needs torch >= 2.4 (custom_op of torch.library)")
    return _OPS["convolution"](x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)


def batch_norm_train(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """Train-mode BatchNorm over (N, H, W) per channel of x (N, C, H, W), as
    ``F.batch_norm(..., training=True)``: normalises with the batch statistics and, where given,
    moves ``running_mean`` / ``running_var`` (unbiased) towards them by ``momentum`` in place."""
    if _OPS is None:
        raise RuntimeError("dbnetpp.ops.conv_bn needs torch >= 2.4 (custom_op of torch.library)")
    op = _OPS["batch_norm_train"]
    out, _, _, moved_mean, moved_var = op(x, weight, bias, running_mean, running_var, momentum, eps)
    with torch.no_grad():
        for buffer, moved in ((running_mean, moved_mean), (running_var, moved_var)):
            if buffer is not None:
                buffer.copy_(moved)
    return out


def _register_ops() -> Optional[Dict[str, Any]]:
    custom_op = getattr(torch.library, "custom_op", None)
    if custom_op is None:
        return None
    aten = torch.ops.aten
    options = exact_strides_options(custom_op)  # the strides eager gives the kernels, no layout of inductor's

    # the same function is the kernel and the fake: on fake tensors aten's meta kernels give the
    # shapes and the memory formats the real kernels pick
    def conv_forward(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        stride: List[int],
        padding: List[int],
        dilation: List[int],
        transposed: bool,
        output_padding: List[int],
        groups: int,
    ) -> torch.Tensor:
        return aten.convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)

    def conv_grads(
        grad_out: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias_size: Optional[List[int]],
        stride: List[int],
        padding: List[int],
        dilation: List[int],
        transposed: bool,
        output_padding: List[int],
        groups: int,
        needs: List[bool],
    ) -> List[torch.Tensor]:
        grads = aten.convolution_backward(
            grad_out, x, weight, bias_size, stride, padding, dilation, transposed, output_padding, groups, needs
        )
        return [g if need else x.new_empty(0) for g, need in zip(grads, needs)]

    conv = custom_op("dbnetpp::convolution", **options)(conv_forward)
    conv.register_fake(conv_forward)
    conv_backward = custom_op("dbnetpp::convolution_backward", **options)(conv_grads)
    conv_backward.register_fake(conv_grads)

    def conv_setup(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = inputs
        ctx.save_for_backward(x, weight)
        ctx.arguments = (None if bias is None else list(bias.shape), stride, padding, dilation, transposed,
                         output_padding, groups)

    def conv_grad(ctx, grad_out):
        x, weight = ctx.saved_tensors
        bias_size = ctx.arguments[0]
        needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias_size is not None and ctx.needs_input_grad[2]]
        grads = conv_backward(grad_out, x, weight, *ctx.arguments, needs)
        return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None, None, None)

    conv.register_autograd(conv_grad, setup_context=conv_setup)

    # functional (autograd needs that): the moved running statistics come back as outputs,
    # computed by the same kernel on copies, and the caller writes them into its buffers
    @custom_op("dbnetpp::batch_norm_train", **options)
    def bn(
        x: torch.Tensor,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        running_mean: Optional[torch.Tensor],
        running_var: Optional[torch.Tensor],
        momentum: float,
        eps: float,
    ) -> List[torch.Tensor]:
        moved = [None if r is None else r.clone() for r in (running_mean, running_var)]
        out, mean, invstd = aten.native_batch_norm(x, weight, bias, moved[0], moved[1], True, momentum, eps)
        return [out, mean, invstd, *(x.new_empty(0) if r is None else r for r in moved)]

    @bn.register_fake
    def _(x, weight, bias, running_mean, running_var, momentum, eps):
        stats = x.new_empty(x.shape[1])
        moved = [x.new_empty(0) if r is None else torch.empty_like(r) for r in (running_mean, running_var)]
        return [torch.empty_like(x), stats, torch.empty_like(stats), *moved]

    @custom_op("dbnetpp::batch_norm_train_backward", **options)
    def bn_backward(
        grad_out: torch.Tensor,
        x: torch.Tensor,
        weight: Optional[torch.Tensor],
        mean: torch.Tensor,
        invstd: torch.Tensor,
        eps: float,
        needs: List[bool],
    ) -> List[torch.Tensor]:
        grads = aten.native_batch_norm_backward(grad_out, x, weight, None, None, mean, invstd, True, eps, needs)
        return [g if need else x.new_empty(0) for g, need in zip(grads, needs)]

    @bn_backward.register_fake
    def _(grad_out, x, weight, mean, invstd, eps, needs):
        shapes = (x, mean, mean)
        return [torch.empty_like(s) if need else x.new_empty(0) for s, need in zip(shapes, needs)]

    def bn_setup(ctx, inputs, output):
        x, weight, bias, running_mean, running_var, momentum, eps = inputs
        _, mean, invstd, _, _ = output
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.has_affine = (weight is not None, bias is not None)

    def bn_grad(ctx, grads_of_outputs):
        grad_out = grads_of_outputs[0]
        x, weight, mean, invstd = ctx.saved_tensors
        has_weight, has_bias = ctx.has_affine
        needs = [ctx.needs_input_grad[0], has_weight and ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        grads = bn_backward(grad_out, x, weight, mean, invstd, ctx.eps, needs)
        return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None)

    bn.register_autograd(bn_grad, setup_context=bn_setup)
    return {"convolution": conv, "batch_norm_train": bn}


_OPS = _register_ops()

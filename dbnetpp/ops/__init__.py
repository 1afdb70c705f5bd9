"""Low-level operators."""

import inspect
from typing import Any, Callable, Dict

import torch


def exact_strides_options(custom_op: Callable[..., Any]) -> Dict[str, Any]:
    """Keyword options for ``custom_op`` of ``torch.library``: no argument mutated, and, where
    this torch has it, the ``needs_exact_strides`` (older: ``needs_fixed_stride_order``) tag, so
    inductor hands the kernels inputs with exactly the traced strides, not a layout of its own."""
    options: Dict[str, Any] = {"mutates_args": ()}
    tag = getattr(torch.Tag, "needs_exact_strides", None) or getattr(torch.Tag, "needs_fixed_stride_order", None)
    if tag is not None and "tags" in inspect.signature(custom_op).parameters:
        options["tags"] = (tag,)
    return options

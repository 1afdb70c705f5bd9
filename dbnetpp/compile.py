"""``torch.compile`` support: the one switch the model's Python checks on, and a compile helper.

Every DBNet in ``dbnetpp.models.dbnet.MODEL_NAMES`` compiles whole (``fullgraph=True``) in train
and eval mode: the deformable convolution is one registered operator
(``torch.ops.dbnetpp.modulated_deform_conv2d``), ``DBLoss`` has no data-dependent shape and no
host sync, and the neck's in-place inference paths give way to their functional forms while
dynamo traces (``is_compiling``). ``torch.compile`` needs torch >= 2.1; the deformable
convolution compiles as one node from torch 2.4 (``custom_op`` of ``torch.library``).
"""

from typing import Any

import torch
from torch import nn

__all__ = ["compile_model", "is_compiling", "is_exporting", "unwrap_compiled"]


def is_compiling() -> bool:
    """True while dynamo traces the calling code (``torch.compile``, ``torch.export``)."""
    compiler = getattr(torch, "compiler", None)
    check = getattr(compiler, "is_compiling", None)  # torch >= 2.3
    if check is None:
        check = getattr(getattr(torch, "_dynamo", None), "is_compiling", None)  # torch 2.1 / 2.2
    return bool(check is not None and check())


def is_exporting() -> bool:
    """True while ``torch.export`` traces the calling code (always False before torch 2.5)."""
    check = getattr(getattr(torch, "compiler", None), "is_exporting", None)  # torch >= 2.5
    return bool(check is not None and check())


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """``torch.compile(model, fullgraph=True, **options)``: the whole forward as one graph (an
    error instead of a silent graph break). Training on the CPU keeps eager's convolution and
    BatchNorm kernels, and so eager's numbers (``dbnetpp.ops.conv_bn``). The returned module
    shares ``model``'s parameters; its ``state_dict`` keys carry an ``_orig_mod.`` prefix, so save
    ``unwrap_compiled(it)``."""
    options.setdefault("fullgraph", True)
    return torch.compile(model, **options)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``model`` itself if it is not a compiled module)."""
    return getattr(model, "_orig_mod", model)

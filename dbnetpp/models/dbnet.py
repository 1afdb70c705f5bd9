"""DBNet / DBNet++ detector (backbone -> FPNC neck -> DB head) and its builders.

``build_model("dbnetpp_resnet50_dcnv2")`` is MMOCR v1.0.1's
``dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015`` model; its state-dict keys are MMOCR's, so
``dbnetpp.weights.load_mmocr_checkpoint`` loads MMOCR checkpoints without renaming.
"""

from typing import Any, Callable, Dict, Sequence, Union

import torch
from torch import nn

from dbnetpp.preprocess import SIZE_DIVISOR

from .dcn import ModulatedDeformConv2d
from .fpnc import FPNC
from .head import DBHead
from .resnet import ResNet

__all__ = [
    "DBNet",
    "MODEL_NAMES",
    "build_model",
    "dbnetpp_resnet50_dcnv2",
    "dbnetpp_resnet50",
    "dbnet_resnet18",
    "dbnet_resnet18_tiny",
    "dbnetpp_resnet18_dcnv2_tiny",
    "set_dcn_impl",
]

class DBNet(nn.Module):
    """Single-stage text detector: ``det_head(neck(backbone(x)))``.

    Input x: float (N, 3, H, W), normalised (see ``dbnetpp.preprocess``), H and W multiples of 32.
    Eval mode returns the text-probability map (N, H, W) in (0, 1). Train mode returns a dict
    with ``prob_logits``, ``thr_map`` and ``binary_map``, each (N, H, W).
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, det_head: DBHead, name: str = "dbnet") -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.det_head = det_head
        self.name = name

    @staticmethod
    def check_input(x: torch.Tensor) -> None:
        """Raise ValueError unless x is a float (N, 3, H, W) tensor with H, W multiples of 32."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"DBNet expects a torch.Tensor of shape (N, 3, H, W), got {type(x).__name__}")
        shape = tuple(x.shape)
        if x.dim() != 4 or shape[1] != 3:
            raise ValueError(f"DBNet expects input of shape (N, 3, H, W), got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"DBNet expects a floating-point (normalised) input, got {x.dtype} of shape {shape}")
        if shape[2] % SIZE_DIVISOR or shape[3] % SIZE_DIVISOR or shape[2] == 0 or shape[3] == 0:
            raise ValueError(
                f"DBNet input height and width must be positive multiples of {SIZE_DIVISOR}, got shape {shape}"
                " (pad with dbnetpp.preprocess.batch_images)"
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Neck output (N, C, H/4, W/4)."""
        return self.neck(self.backbone(x))

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        self.check_input(x)
        feats = self.features(x)
        if self.training:
            return self.det_head.forward_train(feats)
        return self.det_head.predict(feats)


def _dbnet(
    name: str,
    *,
    depth: int,
    dcn_stages: Sequence[bool] = (False, False, False, False),
    base_channels: int = 64,
    norm_eval: bool = False,
    frozen_stages: int = -1,
    lateral_channels: int = 256,
    out_channels: int = 64,
    asf: bool = False,
    head_with_bias: bool = False,
    k: float = 50,
    dcn_impl: str = "auto",
) -> DBNet:
    backbone = ResNet(
        depth=depth,
        dcn_stages=dcn_stages,
        norm_eval=norm_eval,
        frozen_stages=frozen_stages,
        base_channels=base_channels,
    )
    neck = FPNC(backbone.out_channels, lateral_channels=lateral_channels, out_channels=out_channels, asf=asf)
    head = DBHead(neck.out_channels, with_bias=head_with_bias, k=k)
    model = DBNet(backbone, neck, head, name=name)
    set_dcn_impl(model, dcn_impl)
    return model


def dbnetpp_resnet50_dcnv2(**kwargs: Any) -> DBNet:
    """MMOCR's DBNet++: ResNet-50 with DCNv2 in stages 2-4, FPNC (256 -> 4x64) with ASF, DB head.

    Keyword arguments override the recipe (see ``build_model``).
    """
    cfg = dict(depth=50, dcn_stages=(False, True, True, True), asf=True)
    return _dbnet("dbnetpp_resnet50_dcnv2", **{**cfg, **kwargs})


def dbnetpp_resnet50(**kwargs: Any) -> DBNet:
    """DBNet++ without deformable convolutions: ResNet-50, FPNC with ASF, DB head."""
    cfg = dict(depth=50, asf=True)
    return _dbnet("dbnetpp_resnet50", **{**cfg, **kwargs})


def dbnet_resnet18(**kwargs: Any) -> DBNet:
    """MMOCR's ``dbnet_resnet18_fpnc``: ResNet-18, FPNC (lateral 256, 4x64) without ASF, DB head."""
    cfg = dict(depth=18, asf=False)
    return _dbnet("dbnet_resnet18", **{**cfg, **kwargs})


def dbnet_resnet18_tiny(**kwargs: Any) -> DBNet:
    """Half-width ResNet-18 (base 32), FPNC lateral 64 -> 4x16 without ASF, DB head on 64 channels.

    A small model that learns on a 2-core CPU in minutes.
    """
    cfg = dict(depth=18, base_channels=32, lateral_channels=64, out_channels=16, asf=False)
    return _dbnet("dbnet_resnet18_tiny", **{**cfg, **kwargs})


class _ScaleOutput:
    """Forward hook multiplying a module's output by ``scale`` (picklable, unlike a lambda)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output * self.scale


def dbnetpp_resnet18_dcnv2_tiny(offset_scale: float = 0.1, **kwargs: Any) -> DBNet:
    """A small DBNet++: half-width ResNet-18 (base 32) with DCNv2 in stages 2-4 (the second 3x3
    conv of each block), FPNC lateral 64 -> 4x16 with ASF, DB head on 64 channels.

    Trained on the CPU by ``PRESETS["tiny_dbnetpp"]`` (Adam): each DCN's offsets and mask
    logits are ``offset_scale`` x its ``conv_offset`` output, which under Adam is a learning
    rate ``offset_scale`` times smaller for the offsets (MMDetection's ``dcn_offset_lr_mult``);
    at full rate Adam drives the offsets of an 8x8 stage-4 map to ~10 pixels and training stalls.
    """
    cfg = dict(depth=18, base_channels=32, lateral_channels=64, out_channels=16, asf=True,
               dcn_stages=(False, True, True, True))
    model = _dbnet("dbnetpp_resnet18_dcnv2_tiny", **{**cfg, **kwargs})
    if offset_scale != 1.0:
        for m in model.modules():
            if isinstance(m, ModulatedDeformConv2d):
                m.conv_offset.register_forward_hook(_ScaleOutput(offset_scale))
    return model


_BUILDERS: Dict[str, Callable[..., DBNet]] = {
    "dbnetpp_resnet50_dcnv2": dbnetpp_resnet50_dcnv2,
    "dbnetpp_resnet50": dbnetpp_resnet50,
    "dbnet_resnet18": dbnet_resnet18,
    "dbnet_resnet18_tiny": dbnet_resnet18_tiny,
    "dbnetpp_resnet18_dcnv2_tiny": dbnetpp_resnet18_dcnv2_tiny,
}

MODEL_NAMES = tuple(_BUILDERS)

_OVERRIDES = (
    "depth",
    "dcn_stages",
    "base_channels",
    "norm_eval",
    "frozen_stages",
    "lateral_channels",
    "out_channels",
    "asf",
    "head_with_bias",
    "k",
    "dcn_impl",
)


def build_model(name: str, **overrides: Any) -> DBNet:
    """Build a detector by name (one of ``MODEL_NAMES``), randomly initialised.

    ``overrides`` replace recipe values: depth, dcn_stages, base_channels, norm_eval,
    frozen_stages, lateral_channels, out_channels, asf, head_with_bias, k, dcn_impl.
    Weights are loaded separately (``dbnetpp.weights``); nothing is downloaded.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name!r}; valid: {', '.join(_OVERRIDES)}")
    return _BUILDERS[name](**overrides)


def set_dcn_impl(model: nn.Module, impl: str) -> int:
    """Set the deformable-conv implementation of every DCN layer in ``model``; returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, ModulatedDeformConv2d):
            m.impl = impl
            count += 1
    return count

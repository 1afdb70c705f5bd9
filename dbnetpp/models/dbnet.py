"""DBNet / DBNet++ detector (backbone -> FPNC neck -> DB head) and its builders, by name.

``build_model(name)`` accepts each MMOCR v1.0.1 DBNet / DBNet++ config name (e.g.
``"dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015"``) and builds that config's network with MMOCR's
state-dict keys, so ``dbnetpp.weights.load_mmocr_checkpoint`` loads MMOCR checkpoints strictly,
without renaming. The short names of earlier releases stay (``dbnetpp_resnet50_dcnv2`` is the
``dbnetpp_resnet50-dcnv2_fpnc_*`` network). ``MODEL_NAMES`` lists every name.
"""

from typing import Any, Callable, Dict, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from dbnetpp.preprocess import SIZE_DIVISOR

from .clip_resnet import CLIPResNet
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
    "same_architecture",
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
    backbone: str = "resnet",
) -> DBNet:
    """Backbone (``"resnet"``: ResNet, optionally with DCNv2; ``"clip_resnet"``: CLIPResNet) ->
    FPNC (``asf``: DBNet++) -> DB head; keyword values are the rows of ``_TABLE``."""
    if backbone not in ("resnet", "clip_resnet"):
        raise ValueError(f"unknown backbone {backbone!r} for {name!r}; expected 'resnet' or 'clip_resnet'")
    if backbone == "clip_resnet":
        if any(dcn_stages):
            raise ValueError(f"{name!r}: CLIPResNet has no deformable convolutions (dcn_stages={tuple(dcn_stages)})")
        net: nn.Module = CLIPResNet(
            depth=depth, norm_eval=norm_eval, frozen_stages=frozen_stages, base_channels=base_channels
        )
    else:
        net = ResNet(
            depth=depth,
            dcn_stages=dcn_stages,
            norm_eval=norm_eval,
            frozen_stages=frozen_stages,
            base_channels=base_channels,
        )
    neck = FPNC(net.out_channels, lateral_channels=lateral_channels, out_channels=out_channels, asf=asf)
    head = DBHead(neck.out_channels, with_bias=head_with_bias, k=k)
    model = DBNet(net, neck, head, name=name)
    set_dcn_impl(model, dcn_impl)
    return model


_DCN_234 = (False, True, True, True)
_R18 = dict(depth=18, norm_eval=False)
_R50 = dict(depth=50, norm_eval=True)  # MMOCR's plain ResNet-50 configs freeze BatchNorm
_R50_DCN = dict(depth=50, dcn_stages=_DCN_234, norm_eval=False)
_CLIP = dict(backbone="clip_resnet", depth=50, norm_eval=True)  # MMDetection's ResNet default

# One row per accepted name: (builder, keyword values). MMOCR v1.0.1 config names first (values
# from ``configs/textdet/dbnet``, ``configs/textdet/dbnetpp`` and their ``_base_`` model files;
# a0..a6 are the architectures of tests/data/mmocr_dbnet_family_keys.json), then the short names.
# Every MMOCR row: FPNC lateral 256 -> 4 x 64, DB head on 256 channels without bias, k = 50,
# frozen_stages -1. ``dbnet_resnet50-dcnv2_fpnc_100k_synthtext`` is left out: MMOCR 1.0.1's own
# config of that name does not parse.
class _ScaleOutput:
    """Forward hook multiplying a module's output by ``scale`` (picklable, unlike a lambda)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output * self.scale


class _Scaled(nn.Module):
    """Parametrization ``weight = scale * stored``: under Adam, whose steps do not depend on the
    gradient's size, the weight then learns ``scale`` times slower (a per-layer LR multiplier)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored * self.scale


def _small_dbnetpp(
    name: str, *, offset_scale: float = 0.1, attention_scale: float = 0.005, **kwargs: Any
) -> DBNet:
    """``_dbnet`` with two learning-rate multipliers that let a narrow DBNet++ learn on a CPU.

    - Each DCN's offsets and mask logits are ``offset_scale`` x its ``conv_offset`` output
      (MMDetection's ``dcn_offset_lr_mult``): at full rate Adam drives the offsets of the small
      8x8 stage-4 map to ~10 pixels and training stalls.
    - The ASF attention's convolutions learn ``attention_scale`` times slower and start at
      ``attention_scale`` x their usual init, the last one at zero (every scale weighted 0.5: the
      network starts as the DBNet with the same weights). The neck has no normalisation, its
      features are ~10 in size, and at full rate
      the attention saturates within a few steps and holds the binary map's dice loss near 0.92
      (measured: no learning in 125 steps at 0.05, DBNet-like learning at 0.005).
    """
    model = _dbnet(name, **kwargs)
    if offset_scale != 1.0:
        for m in model.modules():
            if isinstance(m, ModulatedDeformConv2d):
                m.conv_offset.register_forward_hook(_ScaleOutput(offset_scale))
    attention = getattr(model.neck, "asf_attn", None)
    if attention is not None:
        nn.init.zeros_(attention.attention_wise.conv.weight)
        if attention_scale != 1.0:
            for m in attention.modules():
                if isinstance(m, nn.Conv2d):  # starts at attention_scale x its usual init
                    parametrize.register_parametrization(m, "weight", _Scaled(attention_scale))
    return model


_TINY = dict(depth=18, base_channels=32, lateral_channels=64, out_channels=16)

_TABLE: Dict[str, Tuple[Callable[..., DBNet], Dict[str, Any]]] = {
    # DBNet, ResNet-18 (a0)
    "dbnet_resnet18_fpnc_1200e_icdar2015": (_dbnet, dict(_R18)),
    "dbnet_resnet18_fpnc_1200e_totaltext": (_dbnet, dict(_R18)),
    "dbnet_resnet18_fpnc_100k_synthtext": (_dbnet, dict(_R18)),
    # DBNet, ResNet-50 + DCNv2 in stages 2-4 (a1)
    "dbnet_resnet50-dcnv2_fpnc_1200e_icdar2015": (_dbnet, dict(_R50_DCN)),
    # DBNet, oCLIP ResNet-50 (a2)
    "dbnet_resnet50-oclip_1200e_icdar2015": (_dbnet, dict(_CLIP)),
    # DBNet, ResNet-50 (a3)
    "dbnet_resnet50_1200e_icdar2015": (_dbnet, dict(_R50)),
    # DBNet++, ResNet-50 + DCNv2 (a4)
    "dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015": (_dbnet, dict(_R50_DCN, asf=True)),
    "dbnetpp_resnet50-dcnv2_fpnc_100k_synthtext": (_dbnet, dict(_R50_DCN, asf=True)),
    # DBNet++, oCLIP ResNet-50 (a5)
    "dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015": (_dbnet, dict(_CLIP, asf=True)),
    # DBNet++, ResNet-50 (a6)
    "dbnetpp_resnet50_fpnc_1200e_icdar2015": (_dbnet, dict(_R50, asf=True)),
    # short names of earlier releases (BatchNorm trained, as they always were)
    "dbnetpp_resnet50_dcnv2": (_dbnet, dict(depth=50, dcn_stages=_DCN_234, asf=True)),  # = a4
    "dbnetpp_resnet50": (_dbnet, dict(depth=50, asf=True)),  # = a6
    "dbnet_resnet18": (_dbnet, dict(depth=18)),  # = a0
    # half-width ResNet-18 (base 32), FPNC lateral 64 -> 4 x 16: learns on a 2-core CPU in minutes
    "dbnet_resnet18_tiny": (_dbnet, dict(_TINY)),
    # the same with DCNv2 in stages 3-4 (BasicBlock conv2) and the ASF neck: a small DBNet++
    "dbnetpp_resnet18_dcnv2_tiny": (_small_dbnetpp, dict(_TINY, dcn_stages=(False, False, True, True), asf=True)),
}

MODEL_NAMES: Tuple[str, ...] = tuple(_TABLE)


def dbnetpp_resnet50_dcnv2(**kwargs: Any) -> DBNet:
    """MMOCR's DBNet++ (ResNet-50 + DCNv2 in stages 2-4, FPNC with ASF); same as ``build_model``."""
    return build_model("dbnetpp_resnet50_dcnv2", **kwargs)


def dbnetpp_resnet50(**kwargs: Any) -> DBNet:
    """DBNet++ without deformable convolutions (ResNet-50, FPNC with ASF)."""
    return build_model("dbnetpp_resnet50", **kwargs)


def dbnet_resnet18(**kwargs: Any) -> DBNet:
    """MMOCR's ``dbnet_resnet18_fpnc`` architecture (ResNet-18, FPNC without ASF)."""
    return build_model("dbnet_resnet18", **kwargs)


def dbnet_resnet18_tiny(**kwargs: Any) -> DBNet:
    """Half-width ResNet-18 (base 32), FPNC lateral 64 -> 4x16 without ASF: a CPU-sized model."""
    return build_model("dbnet_resnet18_tiny", **kwargs)


def dbnetpp_resnet18_dcnv2_tiny(**kwargs: Any) -> DBNet:
    """The tiny model with DCNv2 in stages 2-4 and the ASF neck (a small DBNet++)."""
    return build_model("dbnetpp_resnet18_dcnv2_tiny", **kwargs)


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
    "offset_scale",  # dbnetpp_resnet18_dcnv2_tiny only
    "attention_scale",  # dbnetpp_resnet18_dcnv2_tiny only
)


def build_model(name: str, **overrides: Any) -> DBNet:
    """Build a detector by name, randomly initialised.

    ``name``: one of ``MODEL_NAMES``: an MMOCR config name (the network of that config, with its
    ``norm_eval``) or a short name (``dbnetpp_resnet50_dcnv2``, ``dbnetpp_resnet50``,
    ``dbnet_resnet18``, ``dbnet_resnet18_tiny``).

    ``overrides`` replace recipe values: depth, dcn_stages, base_channels, norm_eval,
    frozen_stages, lateral_channels, out_channels, asf, head_with_bias, k, dcn_impl.
    Weights are loaded separately (``dbnetpp.weights``); nothing is downloaded.
    """
    if name not in _TABLE:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name!r}; valid: {', '.join(_OVERRIDES)}")
    builder, values = _TABLE[name]
    return builder(name, **{**values, **overrides})


# training-time settings: they change no parameter, buffer or eval-mode output
_TRAINING_ONLY = ("norm_eval", "frozen_stages", "dcn_impl")


def same_architecture(name: str, other: str) -> bool:
    """True when both names build the same network (same state-dict keys and shapes, same
    eval-mode forward), e.g. an MMOCR config name and its short alias; False for unknown names."""
    if name not in _TABLE or other not in _TABLE:
        return False
    (b1, v1), (b2, v2) = _TABLE[name], _TABLE[other]
    strip = lambda v: {k: x for k, x in v.items() if k not in _TRAINING_ONLY}  # noqa: E731
    return b1 is b2 and strip(v1) == strip(v2)


def set_dcn_impl(model: nn.Module, impl: str) -> int:
    """Set the deformable-conv implementation of every DCN layer in ``model``; returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, ModulatedDeformConv2d):
            m.impl = impl
            count += 1
    return count

"""DBNet / DBNet++ network: ResNet(+DCNv2) or CLIPResNet backbone, FPNC(+ASF) neck, DB head."""

from .clip_resnet import CLIPResNet
from .dbnet import MODEL_NAMES, DBNet, build_model, same_architecture, set_dcn_impl
from .dcn import ModulatedDeformConv2d
from .fpnc import FPNC
from .head import DBHead
from .resnet import ResNet

__all__ = [
    "MODEL_NAMES",
    "CLIPResNet",
    "DBNet",
    "DBHead",
    "FPNC",
    "ModulatedDeformConv2d",
    "ResNet",
    "build_model",
    "same_architecture",
    "set_dcn_impl",
]

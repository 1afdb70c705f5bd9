"""DBNet / DBNet++ network: ResNet(+DCNv2) backbone, FPNC(+ASF) neck, DB head."""

from .dbnet import MODEL_NAMES, DBNet, build_model, set_dcn_impl
from .dcn import ModulatedDeformConv2d
from .fpnc import FPNC
from .head import DBHead
from .resnet import ResNet

__all__ = ["MODEL_NAMES", "DBNet", "DBHead", "FPNC", "ModulatedDeformConv2d", "ResNet", "build_model", "set_dcn_impl"]

"""ResNet backbone with optional modulated deformable convolutions (DCNv2) per stage.

Follows MMDetection's ``ResNet`` as configured by MMOCR's DBNet++ (style "pytorch": the
3x3 ``conv2`` of a Bottleneck carries the stride) while keeping torchvision's parameter
names (``conv1``, ``bn1``, ``layer1``..``layer4``, ``downsample.0/.1``), so torchvision and
MMOCR weights load without renaming. There is no classifier: ``forward`` returns the four
stage outputs at strides 4, 8, 16 and 32.

"Deep Residual Learning for Image Recognition", https://arxiv.org/abs/1512.03385
"Deformable ConvNets v2", https://arxiv.org/abs/1811.11168
"""

from typing import List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .dcn import ModulatedDeformConv2d
from .layers import BatchNorm2d, Conv2d

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "StagedBackbone"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias."""
    return Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34). Output channels = ``planes``.

    With ``dcn`` the second (stride-1) 3x3 convolution is a DCNv2, as in the small DBNet++
    (``dbnetpp_resnet18_dcnv2_tiny``); MMDetection's BasicBlock has no DCN option.
    """

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        dcn: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        if dcn:
            self.conv2: nn.Module = ModulatedDeformConv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        else:
            self.conv2 = conv3x3(planes, planes)
        self.bn2 = BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, optionally deformable) -> 1x1 block. Output channels = 4 * ``planes``."""

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        dcn: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = BatchNorm2d(planes)
        if dcn:
            self.conv2: nn.Module = ModulatedDeformConv2d(
                planes, planes, kernel_size=3, stride=stride, padding=1, bias=False
            )
        else:
            self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_ARCH = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class StagedBackbone(nn.Module):
    """Stem + ``layer1``..``layer4`` with MMDetection's ``frozen_stages`` and ``norm_eval``.

    Subclasses set ``self.frozen_stages`` and ``self.norm_eval``, name their stem modules in
    ``_stem_modules`` and call ``_freeze_stages()`` at the end of ``__init__``.
    """

    frozen_stages: int
    norm_eval: bool

    def _stem_modules(self) -> List[nn.Module]:
        raise NotImplementedError

    def _frozen_modules(self) -> List[nn.Module]:
        """The stem, then ``layer1``..``layer{frozen_stages}``; nothing when ``frozen_stages`` is -1."""
        if self.frozen_stages < 0:
            return []
        return self._stem_modules() + [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]

    def _freeze_stages(self) -> None:
        """Eval mode and no gradients for the frozen modules."""
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> "StagedBackbone":
        """Switch mode, keeping frozen stages (and all BNs if ``norm_eval``) in eval mode."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self


class ResNet(StagedBackbone):
    """ResNet feature extractor returning the outputs of ``layer1``..``layer4``.

    Args:
        depth: 18, 34, 50 or 101.
        dcn_stages: per stage, whether the 3x3 ``conv2`` of every block is a DCNv2. MMOCR's
            DBNet++ uses ``(False, True, True, True)``.
        norm_eval: keep every BatchNorm in eval mode (frozen statistics) during training.
        frozen_stages: -1 freezes nothing; 0 freezes the stem; ``i`` >= 1 freezes the stem and
            ``layer1``..``layer{i}`` (no gradients, BatchNorms kept in eval mode).
        base_channels: stem width; stage ``i`` has ``base_channels * 2**i`` planes (64 is the
            standard ResNet; smaller values give a narrower network).
        in_channels: channels of the input image.
        zero_init_residual: zero the last BN of each block (Goyal et al., 2017); off by default.

    Input (N, in_channels, H, W) -> tuple of 4 tensors (N, C_i, H/s_i, W/s_i) with s = 4, 8, 16, 32
    and C_i = ``out_channels[i]``.
    """

    def __init__(
        self,
        depth: int = 50,
        dcn_stages: Sequence[bool] = (False, False, False, False),
        norm_eval: bool = False,
        frozen_stages: int = -1,
        base_channels: int = 64,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if depth not in _ARCH:
            raise ValueError(f"invalid ResNet depth {depth!r}; expected one of {sorted(_ARCH)}")
        dcn_stages = tuple(bool(d) for d in dcn_stages)
        if len(dcn_stages) != 4:
            raise ValueError(f"dcn_stages must have 4 entries (one per stage), got {len(dcn_stages)}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in [-1, 4], got {frozen_stages}")
        if base_channels < 1:
            raise ValueError(f"base_channels must be positive, got {base_channels}")
        block, layers = _ARCH[depth]

        self.depth = depth
        self.dcn_stages = dcn_stages
        self.norm_eval = norm_eval
        self.frozen_stages = frozen_stages
        self.inplanes = base_channels

        self.conv1 = Conv2d(in_channels, base_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = BatchNorm2d(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        strides = (1, 2, 2, 2)
        out_channels: List[int] = []
        for i in range(4):
            planes = base_channels * 2**i
            layer = self._make_layer(block, planes, layers[i], strides[i], dcn_stages[i])
            self.add_module(f"layer{i + 1}", layer)
            out_channels.append(planes * block.expansion)
        self.out_channels: Tuple[int, ...] = tuple(out_channels)

        # torchvision / mmdet init: Kaiming (fan_out) convs, BN weight 1 and bias 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # The loop above also reached each DCN's conv_offset (an nn.Conv2d): mmcv zeroes it,
        # so a fresh DCN starts as a plain convolution with mask 0.5.
        for m in self.modules():
            if isinstance(m, ModulatedDeformConv2d):
                m.init_offset()
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)
        self._freeze_stages()

    def _make_layer(
        self,
        block: Type[Union[BasicBlock, Bottleneck]],
        planes: int,
        blocks: int,
        stride: int,
        dcn: bool,
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, dcn=dcn)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, dcn=dcn))
        return nn.Sequential(*layers)

    def _stem_modules(self) -> List[nn.Module]:
        return [self.conv1, self.bn1]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c2, c3, c4, c5

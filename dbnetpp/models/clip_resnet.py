"""CLIP's modified ResNet-50 (MMOCR's ``CLIPResNet``), the backbone of the oCLIP DBNet / DBNet++.

Differences from the plain ResNet-50 (``dbnetpp.models.resnet``):

- stem: three 3x3 convolutions (3 -> 32 stride 2, 32 -> 32, 32 -> 64), each followed by BatchNorm
  and ReLU, then a 2x2 average pool (stride 2) instead of the 3x3 max pool;
- blocks never stride a convolution: a strided block average-pools (2x2, stride 2) after the
  ReLU of its 3x3 ``conv2``, and its shortcut average-pools (ceil mode, padding not counted)
  before the 1x1 projection (``downsample`` = [AvgPool2d, conv1x1, BN]; the first block of
  ``layer1`` has a kernel-1 pool there, i.e. an identity, as MMDetection's ``avg_down`` builds it).

Parameter and buffer names are MMOCR's (``stem.{0,1,3,4,6,7}``, ``layerK.i.convJ`` / ``bnJ``,
``layerK.0.downsample.{1,2}``), so MMOCR checkpoints and the oCLIP backbone weights
(``resnet50-oclip-7ba0c533.pth``) load without renaming. BatchNorm statistics are frozen in
training by default (``norm_eval=True``): MMOCR's oCLIP configs keep MMDetection's ResNet default.

"Learning Transferable Visual Models From Natural Language Supervision" (CLIP),
https://arxiv.org/abs/2103.00020; "Language Matters: A Weakly Supervised Vision-Language
Pre-training Approach for Scene Text Detection and Spotting" (oCLIP), https://arxiv.org/abs/2203.03911
"""

from typing import List, Optional, Tuple

import torch
from torch import nn

from .layers import BatchNorm2d, Conv2d
from .resnet import StagedBackbone

__all__ = ["CLIPBottleneck", "CLIPResNet"]


class CLIPBottleneck(nn.Module):
    """1x1 -> 3x3 -> (2x2 average pool if ``stride`` is 2) -> 1x1 block, all convs stride 1.

    Input (N, inplanes, H, W) -> (N, 4 * planes, H / stride, W / stride).
    """

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"CLIPBottleneck stride must be 1 or 2, got {stride}")
        self.conv1 = Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        # MMOCR's AvgPool2d plug-in after conv2: kernel 2, stride 2, no padding, floor mode
        self.avgpool: nn.Module = nn.AvgPool2d(2) if stride > 1 else nn.Identity()
        self.conv3 = Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(self.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _stem(in_channels: int, channels: int) -> nn.Sequential:
    """Indices 0/1/2, 3/4/5, 6/7/8: (conv3x3, BN, ReLU) x 3; the first conv has stride 2."""
    half = channels // 2
    return nn.Sequential(
        Conv2d(in_channels, half, 3, stride=2, padding=1, bias=False),
        BatchNorm2d(half),
        nn.ReLU(inplace=True),
        Conv2d(half, half, 3, padding=1, bias=False),
        BatchNorm2d(half),
        nn.ReLU(inplace=True),
        Conv2d(half, channels, 3, padding=1, bias=False),
        BatchNorm2d(channels),
        nn.ReLU(inplace=True),
    )


class CLIPResNet(StagedBackbone):
    """CLIP / oCLIP ResNet-50 feature extractor returning the outputs of ``layer1``..``layer4``.

    Args:
        depth: only 50 (the one MMOCR defines).
        norm_eval: keep every BatchNorm in eval mode (frozen statistics) during training.
        frozen_stages: -1 freezes nothing; 0 freezes the stem; ``i`` >= 1 freezes the stem and
            ``layer1``..``layer{i}`` (no gradients, BatchNorms kept in eval mode).
        base_channels: stem output width (stage ``i`` has ``base_channels * 2**i`` planes).
        in_channels: channels of the input image.

    Input (N, in_channels, H, W), H and W multiples of 32 -> tuple of 4 tensors
    (N, C_i, H/s_i, W/s_i) with s = 4, 8, 16, 32 and C = (256, 512, 1024, 2048) for base 64.
    """

    layers_per_stage = {50: (3, 4, 6, 3)}

    def __init__(
        self,
        depth: int = 50,
        norm_eval: bool = True,
        frozen_stages: int = -1,
        base_channels: int = 64,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth not in self.layers_per_stage:
            raise ValueError(f"invalid CLIPResNet depth {depth!r}; expected one of {sorted(self.layers_per_stage)}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in [-1, 4], got {frozen_stages}")
        if base_channels < 2 or base_channels % 2:
            raise ValueError(f"base_channels must be a positive even number, got {base_channels}")
        self.depth = depth
        self.norm_eval = norm_eval
        self.frozen_stages = frozen_stages
        self.stem = _stem(in_channels, base_channels)
        self.pool = nn.AvgPool2d(2)
        inplanes = base_channels
        out_channels: List[int] = []
        for i, (blocks, stride) in enumerate(zip(self.layers_per_stage[depth], (1, 2, 2, 2))):
            planes = base_channels * 2**i
            layer = self._make_layer(inplanes, planes, blocks, stride)
            self.add_module(f"layer{i + 1}", layer)
            inplanes = planes * CLIPBottleneck.expansion
            out_channels.append(inplanes)
        self.out_channels: Tuple[int, ...] = tuple(out_channels)

        # MMDetection's ResNet init (used when no pretrained weights are loaded): Kaiming
        # (fan_out) convolutions, BN weight 1 and bias 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        self._freeze_stages()

    @staticmethod
    def _make_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out = planes * CLIPBottleneck.expansion
        downsample = None
        if stride != 1 or inplanes != out:
            downsample = nn.Sequential(
                nn.AvgPool2d(stride, stride=stride, ceil_mode=True, count_include_pad=False),
                Conv2d(inplanes, out, 1, bias=False),
                BatchNorm2d(out),
            )
        layers = [CLIPBottleneck(inplanes, planes, stride, downsample)]
        layers += [CLIPBottleneck(out, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _stem_modules(self) -> List[nn.Module]:
        return [self.stem]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool(self.stem(x))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c2, c3, c4, c5

"""CLIPResNet (oCLIP's ResNet-50) piece by piece, against computations written out with
torch.nn.functional from the module's own weights; 2x2 average pools recomputed by reshaping."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dbnetpp.models.clip_resnet import CLIPBottleneck, CLIPResNet

pytestmark = pytest.mark.usefixtures("one_thread")


def randomise_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, _BatchNorm):
                c = m.num_features
                m.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
    return module


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return randomise_bn(CLIPResNet()).eval().double()


def bn(x, m):
    """Eval-mode BatchNorm written out: (x - mean) / sqrt(var + eps) * weight + bias."""
    shape = (1, -1, 1, 1)
    return (x - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps) * m.weight.view(
        shape
    ) + m.bias.view(shape)


def pool2(x):
    """Mean of each 2x2 block (H, W even)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))


def block_by_hand(blk, x, stride):
    out = F.relu(bn(F.conv2d(x, blk.conv1.weight), blk.bn1))
    out = F.relu(bn(F.conv2d(out, blk.conv2.weight, padding=1), blk.bn2))
    if stride == 2:
        out = pool2(out)
    out = bn(F.conv2d(out, blk.conv3.weight), blk.bn3)
    if blk.downsample is None:
        identity = x
    else:
        conv, norm = blk.downsample[1], blk.downsample[2]
        identity = bn(F.conv2d(pool2(x) if stride == 2 else x, conv.weight), norm)
    return F.relu(out + identity)


def test_stem_by_hand(net):
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s = net.stem
    y = F.relu(bn(F.conv2d(x, s[0].weight, stride=2, padding=1), s[1]))
    y = F.relu(bn(F.conv2d(y, s[3].weight, padding=1), s[4]))
    y = F.relu(bn(F.conv2d(y, s[6].weight, padding=1), s[7]))
    y = pool2(y)
    with torch.no_grad():
        got = net.pool(net.stem(x))
    assert got.shape == (2, 64, 16, 24)
    torch.testing.assert_close(got, y, atol=1e-10, rtol=0)
    assert [tuple(s[i].weight.shape) for i in (0, 3, 6)] == [(32, 3, 3, 3), (32, 32, 3, 3), (64, 32, 3, 3)]


@pytest.mark.parametrize("layer,index,stride", [(1, 0, 1), (1, 1, 1), (2, 0, 2), (2, 1, 1), (4, 0, 2)])
def test_bottleneck_by_hand(net, layer, index, stride):
    blk = getattr(net, f"layer{layer}")[index]
    assert isinstance(blk, CLIPBottleneck) and blk.stride == stride
    x = torch.randn(1, blk.conv1.in_channels, 8, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = blk(x)
    assert got.shape == (1, blk.conv3.out_channels, 8 // stride, 12 // stride)
    torch.testing.assert_close(got, block_by_hand(blk, x, stride), atol=1e-10, rtol=0)


def test_all_convolutions_have_stride_1_and_pools_downsample(net):
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    strided = [m for m in convs if m.stride != (1, 1)]
    assert strided == [net.stem[0]]  # only the first stem conv strides
    for i in (2, 3, 4):
        blk = getattr(net, f"layer{i}")[0]
        assert isinstance(blk.avgpool, nn.AvgPool2d) and isinstance(blk.downsample[0], nn.AvgPool2d)
    # layer1's first shortcut: a kernel-1 pool (identity), as MMDetection's avg_down builds it
    assert net.layer1[0].downsample[0].kernel_size == 1
    assert all(isinstance(b.avgpool, nn.Identity) for i in (1, 2, 3, 4) for b in getattr(net, f"layer{i}")[1:])


def test_forward_shapes_and_whole_backbone_by_hand(net):
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outs = net(x)
    assert net.out_channels == (256, 512, 1024, 2048)
    assert [tuple(o.shape) for o in outs] == [(1, 256, 16, 24), (1, 512, 8, 12), (1, 1024, 4, 6), (1, 2048, 2, 3)]
    # chain the hand-written blocks through the whole network
    s = net.stem
    y = F.relu(bn(F.conv2d(x, s[0].weight, stride=2, padding=1), s[1]))
    y = F.relu(bn(F.conv2d(y, s[3].weight, padding=1), s[4]))
    y = pool2(F.relu(bn(F.conv2d(y, s[6].weight, padding=1), s[7])))
    for i, out in enumerate(outs, start=1):
        for j, blk in enumerate(getattr(net, f"layer{i}")):
            y = block_by_hand(blk, y, 2 if (i > 1 and j == 0) else 1)
        torch.testing.assert_close(out, y, atol=1e-9, rtol=1e-9)


def test_strides_on_larger_input():
    torch.manual_seed(0)
    model = CLIPResNet(base_channels=16).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 128, 160))
    assert model.out_channels == (64, 128, 256, 512)
    assert [tuple(o.shape[1:]) for o in outs] == [(64, 32, 40), (128, 16, 20), (256, 8, 10), (512, 4, 5)]


def test_norm_eval_keeps_statistics():
    torch.manual_seed(0)
    model = CLIPResNet(base_channels=16)
    assert model.norm_eval  # MMDetection's ResNet default, kept by MMOCR's oCLIP configs
    model.train()
    assert model.training and all(not m.training for m in model.modules() if isinstance(m, _BatchNorm))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(2, 3, 64, 64)).__getitem__(3).sum().backward()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(p.grad is not None for p in model.parameters())

    trainable = CLIPResNet(base_channels=16, norm_eval=False).train()
    assert all(m.training for m in trainable.modules() if isinstance(m, _BatchNorm))


def test_frozen_stages():
    model = CLIPResNet(base_channels=16, norm_eval=False, frozen_stages=2).train()
    frozen = [model.stem, model.layer1, model.layer2]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(not m.training for f in frozen for m in f.modules())
    assert all(p.requires_grad for p in model.layer3.parameters()) and model.layer3.training


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth 101"):
        CLIPResNet(depth=101)
    with pytest.raises(ValueError, match="frozen_stages"):
        CLIPResNet(frozen_stages=5)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        CLIPBottleneck(64, 16, stride=3)

"""dbnetpp.inference: BatchNorm folding and the inference copy of a DBNet."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dbnetpp import allocator
from dbnetpp.inference import PixelShuffleDeconvs, fold_batchnorm, prepare_for_inference
from dbnetpp.models import ModulatedDeformConv2d, build_model
from dbnetpp.models.fpnc import UpsampledConcatConv

pytestmark = pytest.mark.usefixtures("one_thread")


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters, and a non-zero ``conv_offset`` (DCN really deforms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                c = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.weight.copy_(0.4 + 0.6 * torch.rand(c, generator=gen))
                m.bias.copy_(0.2 * torch.randn(c, generator=gen))
            elif isinstance(m, ModulatedDeformConv2d):
                w = m.conv_offset.weight
                w.copy_(0.02 * torch.randn(w.shape, generator=gen))
                m.conv_offset.bias.copy_(torch.randn(m.conv_offset.bias.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def r50_dcn():
    torch.manual_seed(0)
    return randomise(build_model("dbnetpp_resnet50_dcnv2")).eval()


def snapshot(model: nn.Module):
    return (
        copy.deepcopy(model.state_dict()),
        model.training,
        [p.requires_grad for p in model.parameters()],
        [type(m) for m in model.modules()],
    )


def assert_unchanged(model: nn.Module, before) -> None:
    state, training, grads, types = before
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert model.training == training
    assert [p.requires_grad for p in model.parameters()] == grads
    assert [type(m) for m in model.modules()] == types


def test_dcn_model_offsets_really_deform(r50_dcn):
    """Guard for the parity test below: with the randomised conv_offset the DCN differs from a conv."""
    dcn = r50_dcn.backbone.layer3[1].conv2
    x = torch.randn(1, dcn.in_channels, 6, 7)
    offset, _ = dcn.offset_and_mask(x)
    assert offset.abs().mean() > 0.3


@pytest.mark.parametrize("channels_last", [None, False, True])
def test_r50_dcnv2_same_output(r50_dcn, channels_last):
    model = r50_dcn
    before = snapshot(model)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    ref = model(x).detach()  # with autograd on: the plain forward, none of the no-grad shortcuts
    with torch.no_grad():
        fast = prepare_for_inference(model, channels_last=channels_last)
        out = fast(x)
    assert out.shape == (2, 64, 96)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert_unchanged(model, before)


def test_r50_dcnv2_folding_exact_in_float64(r50_dcn):
    """In float64 the folded model equals the original up to rounding (the fold is algebraically exact)."""
    model = copy.deepcopy(r50_dcn).double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = model(x).detach()
    with torch.no_grad():
        out = prepare_for_inference(model, channels_last=False)(x)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_prepared_structure(r50_dcn):
    before = snapshot(r50_dcn)
    fast = prepare_for_inference(r50_dcn)
    assert not fast.training
    assert not any(isinstance(m, _BatchNorm) for m in fast.modules())
    assert fast.det_head.threshold is None
    assert not any(p.requires_grad for p in fast.parameters())
    dcns = [m for m in fast.modules() if isinstance(m, ModulatedDeformConv2d)]
    assert len(dcns) == 13 and all(m.bias is not None for m in dcns)
    assert fast.backbone.layer2[0].conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(fast.neck.asf_split, UpsampledConcatConv)
    assert isinstance(fast.neck.first_smooth_split, UpsampledConcatConv)
    assert any(isinstance(m, PixelShuffleDeconvs) for m in fast.det_head.binarize)
    assert not any("asf_split" in key for key in fast.state_dict())  # derived, not saved
    # the original still has its BNs, threshold branch and gradients
    assert_unchanged(r50_dcn, before)
    assert r50_dcn.det_head.threshold is not None
    assert sum(isinstance(m, _BatchNorm) for m in r50_dcn.modules()) > 0


def test_dbnet_resnet18_same_output():
    torch.manual_seed(0)
    model = randomise(build_model("dbnet_resnet18"), seed=3)
    model.train()  # prepare_for_inference must not care about (or change) the caller's mode
    before = snapshot(model)
    x = torch.randn(1, 3, 96, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fast = prepare_for_inference(model)
        out = fast(x)
        ref = model.eval()(x)
    model.train()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert_unchanged(model, before)


def test_fold_sequential_with_transposed_conv():
    """Conv -> BN and ConvTranspose2d -> BN (output channels on weight dim 1) in a Sequential."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.ConvTranspose2d(6, 4, 2, 2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 1, 2, 2),
    ).double()
    randomise(net)
    net.eval()
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    with torch.no_grad():
        ref = net(x)
        assert fold_batchnorm(net) == 2
        out = net(x)
    assert isinstance(net[1], nn.Identity) and isinstance(net[4], nn.Identity)
    assert net[0].bias is not None
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_bn_not_after_conv_is_kept():
    net = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)).eval()
    assert fold_batchnorm(net) == 0
    assert isinstance(net[1], nn.BatchNorm2d)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_pixel_shuffle_deconvs_equal_two_deconvs(channels_last, bias):
    torch.manual_seed(0)
    first = nn.ConvTranspose2d(6, 5, 2, 2, bias=bias).double()
    second = nn.ConvTranspose2d(5, 2, 2, 2, bias=bias).double()
    fast = PixelShuffleDeconvs(first, second)
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        fast = fast.to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = second(torch.relu(first(x)))
        out = fast(x)
    assert out.shape == (2, 2, 28, 36)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_pixel_shuffle_deconvs_rejects_other_deconvs():
    with pytest.raises(ValueError, match="kernel 2, stride 2"):
        PixelShuffleDeconvs(nn.ConvTranspose2d(4, 4, 3, 2), nn.ConvTranspose2d(4, 1, 2, 2))
    with pytest.raises(ValueError, match="does not feed"):
        PixelShuffleDeconvs(nn.ConvTranspose2d(4, 4, 2, 2), nn.ConvTranspose2d(3, 1, 2, 2))


def test_prepare_keeps_freed_memory_only_when_asked(r50_dcn):
    was = allocator.is_keeping_freed_memory()
    try:
        allocator.restore_default()
        prepare_for_inference(r50_dcn, keep_memory=False)
        assert not allocator.is_keeping_freed_memory()
        prepare_for_inference(r50_dcn)  # CPU model: on by default (Linux with glibc)
        assert allocator.is_keeping_freed_memory() == (allocator._glibc() is not None)
    finally:
        if not was:
            allocator.restore_default()


def test_prepare_leaves_global_rng_alone(r50_dcn):
    """Building the inference modules must not draw from torch's RNG (training calls this for
    every evaluation; its random stream should not depend on that)."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    prepare_for_inference(r50_dcn, keep_memory=False)
    torch.testing.assert_close(torch.rand(4), expected, atol=0, rtol=0)


# one config name per MMOCR architecture (tests/data/mmocr_dbnet_family_keys.json)
ARCHITECTURES = [
    "dbnet_resnet18_fpnc_1200e_icdar2015",
    "dbnet_resnet50-dcnv2_fpnc_1200e_icdar2015",
    "dbnet_resnet50-oclip_1200e_icdar2015",
    "dbnet_resnet50_1200e_icdar2015",
    "dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015",
    "dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015",
    "dbnetpp_resnet50_fpnc_1200e_icdar2015",
]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_architecture_same_output(name):
    torch.manual_seed(0)
    model = randomise(build_model(name), seed=5).eval()
    before = snapshot(model)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(x)
        fast = prepare_for_inference(model, keep_memory=False)
        out = fast(x)
    assert not any(isinstance(m, _BatchNorm) for m in fast.modules())
    assert ((ref > 0.01) & (ref < 0.99)).float().mean() > 0.2  # not a saturated map: the comparison means something
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert_unchanged(model, before)


def test_clip_resnet_folding_exact_in_float64():
    """CLIPResNet's stem Sequential, its pooled shortcuts and its blocks fold exactly (float64)."""
    torch.manual_seed(0)
    model = randomise(build_model("dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015"), seed=7).eval().double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = model(x)
        fast = prepare_for_inference(model, channels_last=False, keep_memory=False)
        out = fast(x)
    assert isinstance(fast.backbone.stem[1], nn.Identity)
    assert isinstance(fast.backbone.layer2[0].downsample[2], nn.Identity)
    assert fast.backbone.layer2[0].downsample[1].bias is not None  # the BN went into the conv
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)

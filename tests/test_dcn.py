import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from dbnetpp.models.dcn import ModulatedDeformConv2d
from dbnetpp.ops import deform_conv


def bilinear_sample(img: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """img (N, C, H, W) sampled at (py, px) (N, Ho, Wo) -> (N, C, Ho, Wo), with DCN's boundary rule:
    a point <= -1 or >= size in either axis gives 0; corners outside the image contribute 0."""
    n, c, h, w = img.shape
    valid = (py > -1) & (py < h) & (px > -1) & (px < w)
    y0, x0 = torch.floor(py), torch.floor(px)
    ly, lx = py - y0, px - x0
    flat = img.reshape(n, c, h * w)
    out = img.new_zeros(n, c, *py.shape[1:])
    for yy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for xx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            inside = valid & (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
            idx = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).long().reshape(n, 1, -1).expand(n, c, -1)
            vals = torch.gather(flat, 2, idx).reshape(out.shape)
            out += vals * (wy * wx * inside).unsqueeze(1)
    return out


def reference_dcn(layer: ModulatedDeformConv2d, x: torch.Tensor) -> torch.Tensor:
    """Independent DCNv2 forward: conv_offset -> (dy, dx) per tap, sigmoid mask, loop over taps."""
    raw = F.conv2d(
        x, layer.conv_offset.weight, layer.conv_offset.bias, layer.stride, layer.padding, layer.dilation
    )
    kh, kw = layer.kernel_size
    taps = kh * kw
    dg = layer.deform_groups
    offset, mask = raw[:, : 2 * dg * taps], torch.sigmoid(raw[:, 2 * dg * taps :])
    n, c, _, _ = x.shape
    ho, wo = raw.shape[2:]
    cpg = c // dg
    base_y = (torch.arange(ho, dtype=x.dtype) * layer.stride[0] - layer.padding[0]).view(1, ho, 1)
    base_x = (torch.arange(wo, dtype=x.dtype) * layer.stride[1] - layer.padding[1]).view(1, 1, wo)
    cols = x.new_zeros(n, c, taps, ho, wo)
    for g in range(dg):
        for i in range(kh):
            for j in range(kw):
                k = i * kw + j
                dy = offset[:, 2 * (g * taps + k)]
                dx = offset[:, 2 * (g * taps + k) + 1]
                py = base_y + i * layer.dilation[0] + dy
                px = base_x + j * layer.dilation[1] + dx
                sampled = bilinear_sample(x[:, g * cpg : (g + 1) * cpg], py, px)
                cols[:, g * cpg : (g + 1) * cpg, k] = sampled * mask[:, g * taps + k].unsqueeze(1)
    out = torch.einsum("nckhw,ock->nohw", cols, layer.weight.reshape(layer.out_channels, c, taps))
    if layer.bias is not None:
        out = out + layer.bias.view(1, -1, 1, 1)
    return out


def test_state_dict_layout_matches_mmcv():
    layer = ModulatedDeformConv2d(8, 16, 3, stride=2, padding=1)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "weight": (16, 8, 3, 3),
        "conv_offset.weight": (27, 8, 3, 3),
        "conv_offset.bias": (27,),
    }
    assert layer.conv_offset.stride == (2, 2) and layer.conv_offset.padding == (1, 1)
    with_bias = ModulatedDeformConv2d(8, 16, 3, bias=True, deform_groups=2)
    assert with_bias.bias.shape == (16,)
    assert with_bias.conv_offset.weight.shape == (2 * 27, 8, 3, 3)


def test_fresh_layer_is_half_a_plain_conv():
    torch.manual_seed(0)
    layer = ModulatedDeformConv2d(4, 6, 3, padding=1)
    assert torch.count_nonzero(layer.conv_offset.weight) == 0 and torch.count_nonzero(layer.conv_offset.bias) == 0
    x = torch.randn(2, 4, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), 0.5 * F.conv2d(x, layer.weight, None, 1, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_zero_offsets_full_mask_equals_conv2d(stride, bias):
    torch.manual_seed(1)
    layer = ModulatedDeformConv2d(5, 7, 3, stride=stride, padding=1, bias=bias)
    with torch.no_grad():
        if bias:
            layer.bias.normal_()
        layer.conv_offset.bias[18:] = 30.0  # sigmoid(30) == 1 in float32
    x = torch.randn(2, 5, 13, 10)
    with torch.no_grad():
        expected = F.conv2d(x, layer.weight, layer.bias, stride=stride, padding=1)
        got = layer(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_hand_computed_half_pixel_shifts_and_borders():
    # 1x1 kernel, one channel, weight 1: output = the input sampled at (y + dy, x + dx).
    layer = ModulatedDeformConv2d(1, 1, kernel_size=1, padding=0)
    x = torch.tensor([[[[1.0, 2.0, 3.0]]]])
    cases = {
        0.5: [1.5, 2.5, 1.5],  # last point 2.5: corner x=3 is outside and contributes 0
        -0.5: [0.5, 1.5, 2.5],  # first point -0.5: corner x=-1 contributes 0
        -1.0: [0.0, 1.0, 2.0],  # point exactly -1 -> 0
        1.0: [2.0, 3.0, 0.0],  # point exactly W -> 0
    }
    with torch.no_grad():
        layer.weight.fill_(1.0)
        for dx, expected in cases.items():
            layer.conv_offset.bias.copy_(torch.tensor([0.0, dx, 30.0]))
            assert layer(x).flatten().tolist() == pytest.approx(expected, abs=1e-6), dx
        # mask logit 0 -> factor 0.5; dy = +0.25 on a single row mixes in zeros below
        layer.conv_offset.bias.copy_(torch.tensor([0.25, 0.0, 0.0]))
        assert layer(x).flatten().tolist() == pytest.approx([0.5 * 0.75 * v for v in (1, 2, 3)], abs=1e-6)


@pytest.mark.parametrize(
    "stride,dilation,deform_groups,bias", [(1, 1, 1, False), (2, 1, 1, True), (1, 2, 2, False), (2, 1, 2, True)]
)
def test_random_offsets_match_reference(stride, dilation, deform_groups, bias):
    torch.manual_seed(2)
    layer = ModulatedDeformConv2d(
        4, 6, 3, stride=stride, padding=dilation, dilation=dilation, bias=bias, deform_groups=deform_groups
    )
    with torch.no_grad():
        # offsets of a few pixels (many points leave the image), masks spread over (0, 1)
        layer.conv_offset.weight.normal_(0.0, 0.6)
        layer.conv_offset.bias.normal_(0.0, 1.5)
        if bias:
            layer.bias.normal_()
    x = torch.randn(2, 4, 11, 9)
    with torch.no_grad():
        expected = reference_dcn(layer, x)
        got = layer(x)
        offsets, _ = layer.offset_and_mask(x)
    assert offsets.abs().max() > 3  # the test does exercise large displacements
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_gradients_match_finite_differences():
    torch.manual_seed(3)
    layer = ModulatedDeformConv2d(2, 3, 3, stride=1, padding=1, bias=True).double()
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0.0, 0.3)
        layer.conv_offset.bias.normal_(0.0, 0.7)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in layer.named_parameters()}
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    names = list(params)

    def f(x, *values):
        return functional_call(layer, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params.values()), eps=1e-6, atol=1e-5, fast_mode=True)


def test_impl_is_a_switchable_attribute_passed_to_the_op(monkeypatch):
    seen = []
    original = deform_conv.modulated_deform_conv2d

    def spy(*args, **kwargs):
        seen.append(kwargs.get("impl"))
        return original(*args, **kwargs)

    monkeypatch.setattr(deform_conv, "modulated_deform_conv2d", spy)
    layer = ModulatedDeformConv2d(3, 4, impl="auto")
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        out_auto = layer(x)
        layer.impl = "torchvision"
        out_tv = layer(x)
    assert seen == ["auto", "torchvision"]
    torch.testing.assert_close(out_auto, out_tv, atol=1e-5, rtol=1e-5)
    assert "impl='torchvision'" in repr(layer)


def test_invalid_deform_groups():
    with pytest.raises(ValueError, match="deform_groups"):
        ModulatedDeformConv2d(6, 4, deform_groups=4)


def test_weight_init_bound():
    layer = ModulatedDeformConv2d(16, 32, 3)
    bound = 1.0 / math.sqrt(16 * 9)
    assert layer.weight.abs().max() <= bound
    assert layer.weight.std() > 0.4 * bound


def _tiny_dcn_net(impl: str) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        ModulatedDeformConv2d(4, 4, 3, stride=1, padding=1, impl=impl),
        torch.nn.ReLU(),
        ModulatedDeformConv2d(4, 2, 3, stride=2, padding=1, bias=True, impl=impl),
    ).double()


def test_first_training_steps_from_zero_offsets_agree_across_impls():
    """mmcv zero-initialises conv_offset, so the first steps see every border tap at exactly -1:
    both implementations must give the same gradients there (mmcv's rule) and then the same
    parameters after two SGD steps."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 9, 11, generator=gen, dtype=torch.float64)
    target = torch.randn(2, 2, 5, 6, generator=gen, dtype=torch.float64)
    results = {}
    for impl in [i for i in deform_conv.IMPLS if i != "auto"]:
        net = _tiny_dcn_net(impl)
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        first_grads = None
        for _ in range(2):
            opt.zero_grad()
            loss = ((net(images) - target) ** 2).mean()
            loss.backward()
            if first_grads is None:
                first_grads = {k: p.grad.clone() for k, p in net.named_parameters()}
            opt.step()
        results[impl] = (first_grads, {k: p.detach().clone() for k, p in net.named_parameters()})
    (ga, pa), (gb, pb) = results.values()
    # the offset predictors receive gradient only through the offset/mask gradients
    assert ga["2.conv_offset.weight"].abs().max() > 1e-3
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-12, rtol=1e-10, msg=lambda m: f"grad {name}: {m}")
        torch.testing.assert_close(pb[name], pa[name], atol=1e-12, rtol=1e-10, msg=lambda m: f"param {name}: {m}")

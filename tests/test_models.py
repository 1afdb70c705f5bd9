import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dbnetpp.models import FPNC, MODEL_NAMES, DBHead, DBNet, ModulatedDeformConv2d, ResNet, build_model
from dbnetpp.models.fpnc import ScaleChannelSpatialAttention, UpsampledConcatConv, upsample_factor


def randomize_bn_stats(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def torchvision_stages(tv: torchvision.models.ResNet, x: torch.Tensor):
    x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    outs = []
    for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
        x = layer(x)
        outs.append(x)
    return outs


@pytest.mark.parametrize("depth,factory", [(50, torchvision.models.resnet50), (18, torchvision.models.resnet18)])
def test_resnet_matches_torchvision(depth, factory):
    torch.manual_seed(0)
    tv = factory()  # random init, no download
    randomize_bn_stats(tv)
    ours = ResNet(depth)
    sd = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    ours.load_state_dict(sd, strict=True)
    tv.eval()
    ours.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = torchvision_stages(tv, x)
        got = ours(x)
    assert len(got) == 4
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape == (2, ours.out_channels[i], 64 // 2 ** (i + 2), 96 // 2 ** (i + 2))
        assert (g - e).abs().max() <= 1e-5, f"stage {i}"


def test_resnet18_dcn_is_the_plain_resnet18_at_zero_offsets_and_full_mask():
    """BasicBlock's DCN conv2 (the small DBNet++): with zero offsets and the mask pushed to 1 it is the
    plain 3x3 convolution, so a DCN ResNet-18 with the plain one's weights gives its outputs."""
    torch.manual_seed(0)
    plain = ResNet(18, base_channels=16).eval()
    randomize_bn_stats(plain)
    dcn = ResNet(18, base_channels=16, dcn_stages=(False, True, True, True)).eval()
    layers = [m for m in dcn.modules() if isinstance(m, ModulatedDeformConv2d)]
    assert len(layers) == 6 and all(isinstance(m.conv2, ModulatedDeformConv2d) == (i > 0)
                                    for i, layer in enumerate((dcn.layer1, dcn.layer2, dcn.layer3, dcn.layer4))
                                    for m in layer)  # fmt: skip
    missing, unexpected = dcn.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("conv_offset" in k for k in missing) and len(missing) == 12
    with torch.no_grad():
        for m in layers:
            m.conv_offset.bias[18:] = 40.0  # sigmoid(40) == 1 in float32
        x = torch.randn(2, 3, 64, 96)
        for got, want in zip(dcn(x), plain(x)):
            assert (got - want).abs().max() <= 1e-4
        for m in layers:
            m.conv_offset.bias[18:] = 0.0  # mask 0.5: not the plain network any more
        assert (dcn(x)[3] - plain(x)[3]).abs().max() > 1e-2


def test_resnet_options_and_errors():
    with pytest.raises(ValueError, match="depth"):
        ResNet(42)
    with pytest.raises(ValueError, match="dcn_stages"):
        ResNet(50, dcn_stages=(True, True))
    r = ResNet(50, dcn_stages=(False, True, True, True))
    dcn = [name for name, m in r.named_modules() if isinstance(m, ModulatedDeformConv2d)]
    assert len(dcn) == 4 + 6 + 3
    assert all(name.endswith(".conv2") and not name.startswith("layer1") for name in dcn)
    # style "pytorch": the stride sits on conv2 (3x3), conv1 (1x1) keeps stride 1
    assert r.layer2[0].conv2.stride == (2, 2) and r.layer2[0].conv1.stride == (1, 1)
    assert r.layer2[0].downsample[0].stride == (2, 2)
    narrow = ResNet(18, base_channels=32)
    assert narrow.out_channels == (32, 64, 128, 256)
    assert narrow.conv1.out_channels == 32


def test_resnet_init():
    torch.manual_seed(0)
    r = ResNet(50, dcn_stages=(False, True, True, True))
    for m in r.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, ModulatedDeformConv2d):
            assert torch.count_nonzero(m.conv_offset.weight) == 0
            assert torch.count_nonzero(m.conv_offset.bias) == 0
    # Kaiming normal, fan_out, relu: std = sqrt(2 / (out * k * k))
    w = r.layer3[0].conv1.weight  # (256, 512, 1, 1)
    assert w.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.05)


def test_frozen_stages_and_norm_eval():
    r = ResNet(18, frozen_stages=1, norm_eval=False).train()
    assert not r.conv1.weight.requires_grad and not r.bn1.weight.requires_grad
    assert all(not p.requires_grad for p in r.layer1.parameters())
    assert all(p.requires_grad for p in r.layer2.parameters())
    assert not r.bn1.training and not r.layer1[0].bn1.training and r.layer2[0].bn1.training

    r = ResNet(18, norm_eval=True)
    r.train()
    assert r.training and r.layer1[0].conv1.training
    bns = [m for m in r.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not m.training for m in bns)
    before = r.layer2[0].bn1.running_mean.clone()
    r(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, r.layer2[0].bn1.running_mean)
    assert all(p.requires_grad for p in r.parameters())


def reference_fpnc(neck: FPNC, feats):
    """FPNC + ASF written out functionally from MMOCR's description, using the neck's weights."""
    lats = [F.conv2d(f, m.conv.weight) for f, m in zip(feats, neck.lateral_convs)]
    for i in (3, 2, 1):
        lats[i - 1] = lats[i - 1] + F.interpolate(lats[i], size=lats[i - 1].shape[2:], mode="nearest")
    smooth = [F.conv2d(lat, m.conv.weight, padding=1) for lat, m in zip(lats, neck.smooth_convs)]
    ups = [F.interpolate(s, size=smooth[0].shape[2:], mode="nearest") for s in smooth]
    cat = torch.cat(ups, 1)
    if not neck.asf:
        return cat
    fused = F.conv2d(cat, neck.asf_conv.conv.weight, neck.asf_conv.conv.bias, padding=1)
    a = neck.asf_attn
    z = torch.sigmoid(
        F.conv2d(F.relu(F.conv2d(fused.mean((2, 3), keepdim=True), a.channel_wise[0].conv.weight)),
                 a.channel_wise[1].conv.weight)
    )
    xx = z + fused
    s = torch.sigmoid(
        F.conv2d(F.relu(F.conv2d(xx.mean(1, keepdim=True), a.spatial_wise[0].conv.weight, padding=1)),
                 a.spatial_wise[1].conv.weight)
    )
    xx = s + xx
    att = torch.sigmoid(F.conv2d(xx, a.attention_wise.conv.weight))
    return torch.cat([att[:, i : i + 1] * ups[i] for i in range(4)], 1)


# level sizes: exact power-of-two multiples (inputs padded to 32: the view / split fast paths)
# and odd ones (a 100x150 input gives 25x38, 13x19, 7x10, 4x5: interpolation fallbacks)
EXACT_SIZES = [(24, 40), (12, 20), (6, 10), (3, 5)]
ODD_SIZES = [(25, 38), (13, 19), (7, 10), (4, 5)]


@pytest.mark.parametrize("sizes", [EXACT_SIZES, ODD_SIZES], ids=["exact", "odd"])
@pytest.mark.parametrize("mode", ["grad", "no_grad", "split", "split_channels_last"])
@pytest.mark.parametrize("asf", [True, False])
def test_fpnc_matches_functional_reference(asf, mode, sizes):
    """Every forward path of the neck (autograd; no-grad views and attention projection;
    split ASF conv of ``prepare_for_inference``, also channels_last) against the reference."""
    torch.manual_seed(0)
    # float64: the fast paths re-associate sums, so float32 would differ by rounding only
    neck = FPNC((8, 16, 32, 64), lateral_channels=16, out_channels=8, asf=asf).double()
    with torch.no_grad():
        if asf:
            neck.asf_conv.conv.bias.normal_()
    feats = [torch.randn(2, c, h, w, dtype=torch.float64) for c, (h, w) in zip((8, 16, 32, 64), sizes)]
    if mode.startswith("split"):
        neck.split_for_inference()
        assert (neck.asf_split is not None) == asf and neck.first_smooth_split is not None
    if mode == "split_channels_last":
        neck = neck.to(memory_format=torch.channels_last)
        feats = [f.to(memory_format=torch.channels_last) for f in feats]
    with torch.no_grad():
        expected = reference_fpnc(neck, feats)
    with torch.set_grad_enabled(mode == "grad"):
        out = neck(feats)
    assert out.shape == (2, 32, *sizes[0])
    if mode == "split_channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.detach(), expected, atol=1e-10, rtol=1e-10)


def test_fpnc_no_grad_paths_leave_inputs_alone():
    """The in-place top-down add works on the lateral conv outputs, never on the caller's tensors."""
    torch.manual_seed(0)
    neck = FPNC((8, 16, 32, 64), lateral_channels=16, out_channels=8)
    neck.split_for_inference()
    feats = [torch.randn(1, c, h, w) for c, (h, w) in zip((8, 16, 32, 64), EXACT_SIZES)]
    copies = [f.clone() for f in feats]
    with torch.no_grad():
        neck(feats)
    assert all(torch.equal(a, b) for a, b in zip(feats, copies))


@pytest.mark.parametrize("factors", [(1, 2, 4, 8), (1, 1, 2), (1, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_upsampled_concat_conv_equals_conv_of_upsampled(factors, bias):
    torch.manual_seed(0)
    channels = [3, 5, 2, 4][: len(factors)]
    conv = nn.Conv2d(sum(channels), 6, 3, padding=1, bias=bias).double()
    split = UpsampledConcatConv.from_conv(conv, channels, factors)
    size = (16, 24)
    levels = [torch.randn(2, c, size[0] // s, size[1] // s, dtype=torch.float64) for c, s in zip(channels, factors)]
    assert split.accepts(levels)
    upsampled = [F.interpolate(x, size=size, mode="nearest") for x in levels]
    with torch.no_grad():
        expected = conv(torch.cat(upsampled, 1))
        out = split(levels)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_upsampled_concat_conv_rejects():
    conv = nn.Conv2d(8, 4, 3, padding=1)
    with pytest.raises(ValueError, match="3x3 conv with stride 1"):
        UpsampledConcatConv.from_conv(nn.Conv2d(8, 4, 3, padding=1, stride=2), [4, 4], [1, 2])
    with pytest.raises(ValueError, match="must sum"):
        UpsampledConcatConv.from_conv(conv, [4, 3], [1, 2])
    split = UpsampledConcatConv.from_conv(conv, [4, 4], [1, 2])
    odd = [torch.randn(1, 4, 9, 9), torch.randn(1, 4, 5, 5)]  # 9 is not 2 x 5
    assert not split.accepts(odd)
    with pytest.raises(ValueError, match="do not match"):
        split(odd)


def test_upsample_factor():
    t = torch.empty
    assert upsample_factor(t(1, 1, 3, 5), t(1, 1, 24, 40)) == 8
    assert upsample_factor(t(1, 1, 3, 5), t(1, 1, 3, 5)) == 1
    assert upsample_factor(t(1, 1, 3, 5), t(1, 1, 9, 15)) is None  # 3 is not a power of two
    assert upsample_factor(t(1, 1, 3, 5), t(1, 1, 6, 20)) is None  # different factors per axis
    assert upsample_factor(t(1, 1, 4, 5), t(1, 1, 7, 10)) is None


@pytest.mark.parametrize("bias", [False, True])
def test_asf_attention_projection_equals_sums(bias):
    """The inference form of ScaleChannelSpatialAttention (one 1x1 projection) equals MMOCR's sums."""
    torch.manual_seed(0)
    attn = ScaleChannelSpatialAttention(16, 4, 4).double()
    with torch.no_grad():
        for m in attn.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_()
        if bias:
            attn.attention_wise.conv.bias = nn.Parameter(torch.randn(4, dtype=torch.float64))
    x = torch.randn(2, 16, 7, 9, dtype=torch.float64)
    expected = attn(x)  # autograd enabled: the summed form
    with torch.no_grad():
        out = attn(x)
    assert expected.requires_grad and not out.requires_grad
    torch.testing.assert_close(out, expected.detach(), atol=1e-12, rtol=0)


def test_fpnc_keys_and_init():
    torch.manual_seed(0)
    neck = FPNC()
    shapes = {k: tuple(v.shape) for k, v in neck.state_dict().items()}
    assert shapes["asf_conv.conv.bias"] == (256,)
    assert shapes["asf_attn.channel_wise.0.conv.weight"] == (64, 256, 1, 1)
    assert shapes["asf_attn.attention_wise.conv.weight"] == (4, 256, 1, 1)
    assert "lateral_convs.0.conv.bias" not in shapes and "smooth_convs.0.conv.bias" not in shapes
    assert torch.count_nonzero(neck.asf_conv.conv.bias) == 0
    w = neck.lateral_convs[3].conv.weight  # fan_out = 256
    assert w.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.05)
    w = neck.smooth_convs[0].conv.weight  # fan_out = 64 * 9
    assert w.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
    plain = FPNC(asf=False)
    assert not any(k.startswith("asf") for k in plain.state_dict())


def test_head_branches():
    torch.manual_seed(0)
    head = DBHead(32, k=50)
    keys = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert keys["binarize.0.weight"] == (8, 32, 3, 3) and "binarize.0.bias" not in keys
    assert keys["threshold.6.weight"] == (8, 1, 2, 2) and keys["binarize.6.bias"] == (1,)
    assert isinstance(head.threshold[7], nn.Sigmoid) and len(head.binarize) == 7
    assert "binarize.0.bias" in DBHead(32, with_bias=True).state_dict()
    assert "threshold.0.bias" not in DBHead(32, with_bias=True).state_dict()

    x = torch.randn(2, 32, 5, 7)
    head.train()
    out = head(x)
    assert set(out) == {"prob_logits", "thr_map", "binary_map"}
    for v in out.values():
        assert v.shape == (2, 20, 28)
    expected = 1.0 / (1.0 + torch.exp(-50 * (torch.sigmoid(out["prob_logits"]) - out["thr_map"])))
    torch.testing.assert_close(out["binary_map"], expected)
    assert out["thr_map"].min() > 0 and out["thr_map"].max() < 1

    calls = []
    head.threshold.register_forward_hook(lambda *a: calls.append(1))
    head.eval()
    prob = head(x)
    assert not calls, "threshold branch must not run in eval mode"
    torch.testing.assert_close(prob, torch.sigmoid(head.binarize(x).squeeze(1)))


@pytest.mark.parametrize("with_bias", [False, True])
def test_head_bias_before_train_batchnorm_has_exact_zero_gradient(with_bias):
    """The deconv biases right before a train-mode BatchNorm (and binarize.0's, with_bias) get
    gradient 0; everything else is bit for bit what a plain nn.Sequential gives, running
    statistics included. In float64 the loss does not move when those biases do; with the
    BatchNorm frozen (eval) the bias has a real gradient again."""
    torch.manual_seed(0)
    head = DBHead(32, with_bias=with_bias).train()
    plain = DBHead(32, with_bias=with_bias).train()
    plain.load_state_dict(head.state_dict())
    plain.binarize = nn.Sequential(*plain.binarize)
    plain.threshold = nn.Sequential(*plain.threshold)
    cancelled = {"binarize.3.bias", "threshold.3.bias"} | ({"binarize.0.bias"} if with_bias else set())
    x = torch.randn(2, 32, 5, 7)
    weights = {k: torch.rand(2, 20, 28, generator=torch.Generator().manual_seed(i))
               for i, k in enumerate(("prob_logits", "thr_map", "binary_map"))}
    for net in (head, plain):
        out = net(x)
        sum((weights[k] * v).sum() for k, v in out.items()).backward()
        net.out = {k: v.detach() for k, v in out.items()}
    for k in weights:
        assert torch.equal(head.out[k], plain.out[k]), k
    for (name, a), b in zip(head.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    plain_grads = dict(plain.named_parameters())
    for name, p in head.named_parameters():
        if name in cancelled:
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
            assert plain_grads[name].grad.abs().max() > 0, name  # autograd's rounding noise
        else:
            assert torch.equal(p.grad, plain_grads[name].grad), name

    head64 = DBHead(32, with_bias=with_bias).double().train()
    x64 = x.double()
    loss = lambda: sum((weights[k].double() * v).sum() for k, v in head64(x64).items())  # noqa: E731
    before = loss().item()
    with torch.no_grad():
        for name, p in head64.named_parameters():
            if name in cancelled:
                p.add_(0.5)
    assert loss().item() == pytest.approx(before, rel=1e-12)

    head.zero_grad()
    head.binarize[4].eval()  # frozen statistics: the bias now moves the output
    sum(v.sum() for v in head(x).values()).backward()
    assert head.binarize[3].bias.grad.abs().max() > 1e-3
    assert torch.count_nonzero(head.threshold[3].bias.grad) == 0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_builders_output_shapes(name):
    torch.manual_seed(0)
    model = build_model(name)
    assert isinstance(model, DBNet) and model.name == name
    model.train()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert set(out) == {"prob_logits", "thr_map", "binary_map"}
    for v in out.values():
        assert v.shape == (1, 64, 96)
    model.eval()
    with torch.no_grad():
        for h, w in [(64, 64), (96, 160), (128, 96)]:
            x = torch.randn(1, 3, h, w)
            prob = model(x)
            assert prob.shape == (1, h, w)
            # random weights give large logits, so float32 sigmoid may round to exactly 0 or 1
            assert torch.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1
            if h == w:
                logits = model.det_head.prob_logits(model.features(x))
                torch.testing.assert_close(prob, torch.sigmoid(logits))
                assert ((prob > 0) & (prob < 1)).float().mean() > 0.5


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.zeros(3, 64, 64), r"\(3, 64, 64\)"),
        (torch.zeros(1, 1, 64, 64), r"\(1, 1, 64, 64\)"),
        (torch.zeros(1, 3, 64, 70), r"\(1, 3, 64, 70\)"),
        (torch.zeros(1, 3, 48, 64), r"\(1, 3, 48, 64\)"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), r"uint8"),
    ],
)
def test_input_validation(x, match):
    model = build_model("dbnet_resnet18_tiny").eval()
    with pytest.raises(ValueError, match=match):
        model(x)


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = build_model("dbnetpp_resnet50_dcnv2").train()
    out = model(torch.randn(1, 3, 64, 64))
    g = torch.Generator().manual_seed(1)
    loss = sum((torch.rand(v.shape, generator=g) * v).sum() for v in out.values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    offset_grads = [m.conv_offset.weight.grad for m in model.modules() if isinstance(m, ModulatedDeformConv2d)]
    assert len(offset_grads) == 13
    assert all(gr.abs().sum() > 0 for gr in offset_grads)


def test_small_dbnetpp_attention_starts_uniform_and_learns_slowly():
    """dbnetpp_resnet18_dcnv2_tiny: the ASF attention weights every scale 0.5 at the start, and
    one Adam step moves its convolution weights attention_scale x lr, not lr (the LR multiplier
    that lets the narrow DBNet++ learn); the offsets are offset_scale x conv_offset's output."""
    torch.manual_seed(0)
    model = build_model("dbnetpp_resnet18_dcnv2_tiny", attention_scale=0.01)
    model.train()
    x = torch.randn(2, 3, 64, 64)
    captured = {}
    hook = model.neck.asf_attn.register_forward_hook(lambda m, i, o: captured.setdefault("a", o))
    out = model(x)
    hook.remove()
    assert torch.equal(captured["a"], torch.full_like(captured["a"], 0.5))

    attn = model.neck.asf_attn.attention_wise.conv  # the one with a gradient while it is zero
    before = attn.weight.detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    (out["prob_logits"].mean() + out["thr_map"].mean()).backward()
    opt.step()
    moved = (attn.weight.detach() - before).abs().max().item()
    assert 0 < moved <= 1e-3 * 0.01 * 1.01  # Adam's first step is lr per element, times the scale
    head = model.det_head.binarize[0]
    assert head.weight.grad is not None

    dcn = next(m for m in model.modules() if isinstance(m, ModulatedDeformConv2d))
    with torch.no_grad():
        dcn.conv_offset.weight.zero_()
        dcn.conv_offset.bias.fill_(1.0)
        offset, _ = dcn.offset_and_mask(torch.randn(1, dcn.in_channels, 8, 8))
    assert torch.allclose(offset, torch.full_like(offset, 0.1))  # offset_scale 0.1 x conv_offset's 1.0

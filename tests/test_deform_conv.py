"""dbnetpp.ops.deform_conv: the fast PyTorch DCNv2 against torchvision and hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from dbnetpp.ops import deform_conv
from dbnetpp.ops.deform_conv import modulated_deform_conv2d, resolve_impl

pytestmark = pytest.mark.usefixtures("one_thread")


def out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def make_case(n, c, h, w, o, k, stride, padding, dilation, dg, with_mask, with_bias, spread, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ho = out_size(h, k[0], stride[0], padding[0], dilation[0])
    wo = out_size(w, k[1], stride[1], padding[1], dilation[1])
    kk = k[0] * k[1]
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    offset = spread * torch.randn(n, 2 * dg * kk, ho, wo, generator=gen, dtype=dtype)
    mask = torch.rand(n, dg * kk, ho, wo, generator=gen, dtype=dtype) if with_mask else None
    weight = torch.randn(o, c, *k, generator=gen, dtype=dtype) / (c * kk) ** 0.5
    bias = torch.randn(o, generator=gen, dtype=dtype) if with_bias else None
    return x, offset, mask, weight, bias


# (n, c, h, w, o, kernel, stride, padding, dilation, deform_groups, mask, bias)
CASES = {
    "basic": (1, 4, 9, 11, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, False),
    "odd_batch2_bias": (2, 6, 13, 17, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, True),
    "stride2": (2, 5, 13, 17, 3, (3, 3), (2, 2), (1, 1), (1, 1), 1, True, True),
    "dilation2": (1, 4, 13, 17, 4, (3, 3), (1, 1), (2, 2), (2, 2), 1, True, False),
    "no_mask": (2, 4, 10, 7, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1, False, True),
    "deform_groups2": (2, 6, 13, 17, 5, (3, 3), (1, 2), (1, 1), (1, 1), 2, True, True),
    "kernel_2x3_groups3": (1, 6, 8, 9, 4, (2, 3), (2, 1), (0, 2), (1, 2), 3, True, False),
    "one_row": (1, 3, 1, 6, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, True),
}


def run_both(case, dtype, spread=3.0, grad=False):
    n, c, h, w, o, k, stride, padding, dilation, dg, with_mask, with_bias = case
    tensors = make_case(n, c, h, w, o, k, stride, padding, dilation, dg, with_mask, with_bias, spread, dtype)
    outs, grads = [], []
    for impl in ("torchvision", "fast"):
        inputs = [t.clone().requires_grad_(grad) if t is not None else None for t in tensors]
        out = modulated_deform_conv2d(*inputs, stride=stride, padding=padding, dilation=dilation, impl=impl)
        outs.append(out)
        if grad:
            gen = torch.Generator().manual_seed(1)
            out.backward(torch.randn(out.shape, generator=gen, dtype=dtype))
            grads.append([t.grad if t is not None else None for t in inputs])
    return outs, grads


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several im2col chunks (a few output pixels each) so chunk boundaries are exercised."""
    monkeypatch.setattr(deform_conv, "CHUNK_BYTES", 64)
    monkeypatch.setattr(deform_conv, "MIN_CHUNK_ROWS", 7)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_matches_torchvision(name, small_chunks):
    case = CASES[name]
    (ref, fast), (gref, gfast) = run_both(case, torch.float32, grad=True)
    assert fast.shape == ref.shape
    # offsets of ~3 px put many taps (partly) outside the image: the boundary rule is exercised
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    for label, a, b in zip(("input", "offset", "mask", "weight", "bias"), gfast, gref):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape, label
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5, msg=lambda m: f"grad {label}: {m}")


@pytest.mark.parametrize("name", ["deform_groups2", "kernel_2x3_groups3", "one_row"])
def test_fixed_size_scatter_equals_the_cpu_scatter(name, small_chunks, monkeypatch):
    """The input-gradient scatter used off the CPU (one bag per table row, sizes from shapes only)
    gives the CPU one's gradients (float64, every chunk boundary)."""
    (_, _), (_, cpu_grads) = run_both(CASES[name], torch.float64, spread=5.0, grad=True)
    monkeypatch.setattr(deform_conv, "_FIXED_SIZE_SCATTER", True)

    def value_dependent_size(*args, **kwargs):
        raise AssertionError("the fixed-size scatter called unique_consecutive")

    monkeypatch.setattr(torch, "unique_consecutive", value_dependent_size)
    (_, _), (torchvision_grads, fixed_grads) = run_both(CASES[name], torch.float64, spread=5.0, grad=True)
    for a, b, ref in zip(fixed_grads, cpu_grads, torchvision_grads):
        if ref is None:
            continue
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
        torch.testing.assert_close(a, ref, atol=1e-11, rtol=0)


def test_fast_float64_exact():
    (ref, fast), (gref, gfast) = run_both(CASES["deform_groups2"], torch.float64, spread=5.0, grad=True)
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=0)
    for a, b in zip(gfast, gref):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=0)


def test_gradcheck_float64():
    x, offset, mask, weight, bias = make_case(
        1, 2, 4, 5, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, True, 1.5, torch.float64, seed=3
    )
    inputs = tuple(t.requires_grad_() for t in (x, offset, mask, weight, bias))

    def fn(*args):
        return modulated_deform_conv2d(*args, impl="fast")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_hand_computed_bilinear_shift():
    """A centre-tap-only kernel with a constant offset samples the image bilinearly at a shift."""
    h, w = 5, 6
    img = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w) ** 1.5
    weight = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    weight[0, 0, 1, 1] = 1.0
    dy, dx = 0.25, -0.5
    offset = torch.zeros(1, 18, h, w, dtype=torch.float64)
    offset[:, 8] = dy  # centre tap k = 4: channels 8 (dy), 9 (dx)
    offset[:, 9] = dx
    mask = torch.full((1, 9, h, w), 0.5, dtype=torch.float64)
    out = modulated_deform_conv2d(img, offset, mask, weight, impl="fast")[0, 0]

    expected = torch.zeros(h, w, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            sy, sx = y + dy, x + dx
            y0, x0 = int(torch.floor(torch.tensor(sy))), int(torch.floor(torch.tensor(sx)))
            value = 0.0
            for yy, wy in ((y0, 1 - (sy - y0)), (y0 + 1, sy - y0)):
                for xx, wx in ((x0, 1 - (sx - x0)), (x0 + 1, sx - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        value += wy * wx * img[0, 0, yy, xx].item()
            expected[y, x] = 0.5 * value
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_zero_offset_is_plain_convolution():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 10, generator=gen)
    weight = torch.randn(4, 3, 3, 3, generator=gen)
    bias = torch.randn(4, generator=gen)
    offset = torch.zeros(2, 18, 4, 5)
    out = modulated_deform_conv2d(x, offset, None, weight, bias, stride=2, padding=1, impl="fast")
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, 2, 1), atol=1e-5, rtol=0)


def test_points_far_outside_read_zero():
    x = torch.randn(1, 2, 5, 5)
    weight = torch.randn(3, 2, 3, 3)
    offset = torch.full((1, 18, 5, 5), 1e4)
    offset[:, 1::2] = float("-inf")
    mask = torch.rand(1, 9, 5, 5)
    out = modulated_deform_conv2d(x, offset, mask, weight, impl="fast")
    assert torch.equal(out, torch.zeros_like(out))
    ref = tv_deform_conv2d(x, offset, weight, mask=mask, padding=1)
    torch.testing.assert_close(out, ref)


def test_channels_last_input():
    x, offset, mask, weight, bias = make_case(
        2, 8, 12, 14, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, True, 2.0, torch.float32
    )
    ref = tv_deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w_cl = weight.contiguous(memory_format=torch.channels_last)
    out = modulated_deform_conv2d(x_cl, offset, mask, w_cl, bias, impl="fast")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # and a contiguous (NCHW) input gives a contiguous output, as a convolution would
    assert modulated_deform_conv2d(x, offset, mask, weight, bias, impl="fast").is_contiguous()


def test_strided_offset_and_mask():
    """Offsets and mask sliced from one channels_last conv output (as in a channels_last model)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 9, 10, generator=gen)
    raw = (2.0 * torch.randn(2, 27, 9, 10, generator=gen)).contiguous(memory_format=torch.channels_last)
    offset, mask = raw[:, :18], raw[:, 18:].sigmoid()
    weight = torch.randn(3, 4, 3, 3, generator=gen)
    ref = tv_deform_conv2d(x, offset.contiguous(), weight, padding=1, mask=mask.contiguous())
    torch.testing.assert_close(modulated_deform_conv2d(x, offset, mask, weight, impl="fast"), ref, atol=1e-5, rtol=0)


def test_reduced_precision_input_runs_in_float32():
    x, offset, mask, weight, _ = make_case(1, 4, 6, 7, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, False, 1.0,
                                           torch.float32)
    ref = modulated_deform_conv2d(x, offset, mask, weight, impl="fast")
    out = modulated_deform_conv2d(x.bfloat16(), offset, mask.bfloat16(), weight, impl="fast")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)


def test_impl_selection_and_validation():
    assert resolve_impl("auto", torch.device("cpu")) == "fast"
    assert resolve_impl("auto", torch.device("cuda")) == "torchvision"
    assert resolve_impl("torchvision", torch.device("cpu")) == "torchvision"
    x = torch.randn(1, 4, 6, 6)
    weight = torch.randn(2, 4, 3, 3)
    offset = torch.zeros(1, 18, 6, 6)
    with pytest.raises(ValueError, match="unknown deformable-conv implementation"):
        modulated_deform_conv2d(x, offset, None, weight, impl="cuda_kernel")
    with pytest.raises(ValueError, match="offset must be"):
        modulated_deform_conv2d(x, offset[:, :, :5], None, weight)
    with pytest.raises(ValueError, match="mask must be"):
        modulated_deform_conv2d(x, offset, torch.zeros(1, 8, 6, 6), weight)
    with pytest.raises(ValueError, match="divisible by deform_groups"):
        modulated_deform_conv2d(x, torch.zeros(1, 54, 6, 6), None, weight)
    with pytest.raises(NotImplementedError):
        modulated_deform_conv2d(x, offset, None, torch.randn(2, 2, 3, 3), impl="fast")


@pytest.mark.parametrize("which", [0, 1, 2, 3, 4])
def test_single_input_gradient(which):
    """Backward with only one input requiring grad (the others' work is skipped) still matches."""
    tensors = make_case(1, 4, 7, 8, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, True, 2.0, torch.float64)
    grads = []
    for impl in ("torchvision", "fast"):
        inputs = [t.clone() for t in tensors]
        inputs[which].requires_grad_()
        out = modulated_deform_conv2d(*inputs, impl=impl)
        (grad,) = torch.autograd.grad((out * out).sum(), [inputs[which]])
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-10, rtol=0)


# --- mmcv's rule, written directly from its modulated_deform_conv kernels (float64 loops) ---------


def _mmcv_corner(img, yy, xx):
    """img (C, H, W) at integer (yy, xx), 0 outside (mmcv reads no corner outside the image)."""
    h, w = img.shape[1:]
    if 0 <= yy <= h - 1 and 0 <= xx <= w - 1:
        return img[:, yy, xx]
    return img.new_zeros(img.shape[0])


def mmcv_reference(x, offset, mask, weight, bias, grad_out, stride, padding, dilation):
    """Output and (input, offset, mask, weight) gradients under mmcv's rule.

    Forward (``dmcn_im2col_bilinear``): a point with y <= -1, x <= -1, y >= H or x >= W reads 0,
    otherwise bilinear over its 4 neighbours, neighbours outside read 0. Offset gradient
    (``dmcn_get_coordinate_weight``): 0 for such points, otherwise the derivative of that
    bilinear form with the low corner at floor(y), floor(x). Mask gradient: column gradient times
    the unmasked sample. Input gradient (``dmcn_get_gradient_weight``): the bilinear weights.
    """
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    k = kh * kw
    dg = offset.shape[1] // (2 * k)
    cg = c // dg
    ho, wo = offset.shape[2:]
    wmat = weight.reshape(o, c, k)
    out = torch.zeros(n, o, ho, wo, dtype=torch.float64)
    gx, goff, gmask, gw = (torch.zeros(t.shape, dtype=torch.float64) for t in (x, offset, mask, weight))
    gw = gw.reshape(o, c, k)
    for b in range(n):
        for oy in range(ho):
            for ox in range(wo):
                g_o = grad_out[b, :, oy, ox]
                col_grad = (wmat * g_o.view(o, 1, 1)).sum(0)  # (C, K)
                for g in range(dg):
                    chans = slice(g * cg, (g + 1) * cg)
                    img = x[b, chans]
                    for i in range(kh):
                        for j in range(kw):
                            t = i * kw + j
                            ch = 2 * (g * k + t)
                            py = oy * stride[0] - padding[0] + i * dilation[0] + offset[b, ch, oy, ox].item()
                            px = ox * stride[1] - padding[1] + j * dilation[1] + offset[b, ch + 1, oy, ox].item()
                            m = mask[b, g * k + t, oy, ox].item()
                            if py <= -1 or px <= -1 or py >= h or px >= w:
                                continue  # reads 0; every gradient of this tap is 0
                            yl, xl = math.floor(py), math.floor(px)
                            ly, lx = py - yl, px - xl
                            v00 = _mmcv_corner(img, yl, xl)
                            v01 = _mmcv_corner(img, yl, xl + 1)
                            v10 = _mmcv_corner(img, yl + 1, xl)
                            v11 = _mmcv_corner(img, yl + 1, xl + 1)
                            val = (1 - ly) * (1 - lx) * v00 + (1 - ly) * lx * v01 + ly * (1 - lx) * v10 + ly * lx * v11
                            out[b, :, oy, ox] += (wmat[:, chans, t] * (m * val)).sum(1)
                            gw[:, chans, t] += g_o.view(o, 1) * (m * val).view(1, cg)
                            cgrad = col_grad[chans, t]
                            gmask[b, g * k + t, oy, ox] = (cgrad * val).sum()
                            d_y = -(1 - lx) * v00 - lx * v01 + (1 - lx) * v10 + lx * v11
                            d_x = -(1 - ly) * v00 + (1 - ly) * v01 - ly * v10 + ly * v11
                            goff[b, ch, oy, ox] = m * (cgrad * d_y).sum()
                            goff[b, ch + 1, oy, ox] = m * (cgrad * d_x).sum()
                            for yy, wy in ((yl, 1 - ly), (yl + 1, ly)):
                                for xx, wx in ((xl, 1 - lx), (xl + 1, lx)):
                                    if 0 <= yy < h and 0 <= xx < w:
                                        gx[b, chans, yy, xx] += m * wy * wx * cgrad
    if bias is not None:
        out += bias.view(1, o, 1, 1)
    return out, (gx, goff, gmask, gw.reshape(weight.shape))


def _offsets(kind, shape, gen):
    if kind == "random":
        return 2.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "mixed":  # integers and halves: taps exactly at -1, 0, H-1, H and between
        return torch.randint(-4, 5, shape, generator=gen).double() / 2
    return torch.full(shape, float(kind), dtype=torch.float64)


MMCV_OFFSETS = ("0", "-1", "1", "2", "0.5", "-0.5", "mixed", "random")
CONCRETE_IMPLS = tuple(i for i in deform_conv.IMPLS if i != "auto")


@pytest.mark.parametrize("impl", CONCRETE_IMPLS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kind", MMCV_OFFSETS)
def test_follows_mmcv_rule(impl, stride, kind):
    """Every implementation gives mmcv's output and input/offset/mask/weight gradients, including
    taps at exactly -1 / 0 / H-1 / H (zero offsets put the border taps of a padding-1 conv at -1)."""
    gen = torch.Generator().manual_seed(len(kind) * 7 + stride)
    n, c, h, w, o, dg = 2, 4, 5, 6, 3, 2
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    offset = _offsets(kind, (n, 2 * dg * 9, ho, wo), gen)
    mask = torch.rand(n, dg * 9, ho, wo, generator=gen, dtype=torch.float64)
    weight = torch.randn(o, c, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(o, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(n, o, ho, wo, generator=gen, dtype=torch.float64)
    ref, ref_grads = mmcv_reference(x, offset, mask, weight, bias, grad_out, (stride,) * 2, (1, 1), (1, 1))
    inputs = [t.clone().requires_grad_(True) for t in (x, offset, mask, weight, bias)]
    out = modulated_deform_conv2d(*inputs, stride=stride, padding=1, dilation=1, impl=impl)
    out.backward(grad_out)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    for label, got, want in zip(("input", "offset", "mask", "weight"), inputs, ref_grads):
        err = (got.grad - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
        assert err < 1e-10, f"{impl} grad {label} at offsets {kind}, stride {stride}: relative error {err:.3g}"


@pytest.mark.parametrize("impl", CONCRETE_IMPLS)
def test_follows_mmcv_rule_float32_zero_offsets(impl):
    """float32 within 1e-4 of the float64 mmcv reference at zero offsets (the first training step)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 6, 5, generator=gen, dtype=torch.float64)
    offset = torch.zeros(1, 18, 6, 5, dtype=torch.float64)
    mask = torch.full((1, 9, 6, 5), 0.5, dtype=torch.float64)
    weight = torch.randn(3, 4, 3, 3, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(1, 3, 6, 5, generator=gen, dtype=torch.float64)
    ref, ref_grads = mmcv_reference(x, offset, mask, weight, None, grad_out, (1, 1), (1, 1), (1, 1))
    inputs = [t.float().requires_grad_(True) for t in (x, offset, mask, weight)]
    out = modulated_deform_conv2d(*inputs, None, stride=1, padding=1, dilation=1, impl=impl)
    out.backward(grad_out.float())
    assert (out.double() - ref).abs().max() < 1e-4 * ref.abs().max()
    for got, want in zip(inputs, ref_grads):
        assert (got.grad.double() - want).abs().max() < 1e-4 * want.abs().max()


def test_weight_groups_follow_mmcv_rule_at_zero_offsets():
    """Weight groups (torchvision path) equal the block-diagonal full weight under mmcv's rule."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 5, 6, generator=gen, dtype=torch.float64)
    offset = torch.zeros(1, 18, 5, 6, dtype=torch.float64)
    mask = torch.rand(1, 9, 5, 6, generator=gen, dtype=torch.float64)
    wg = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)  # 2 groups of 2 -> 2 channels
    full = torch.zeros(4, 4, 3, 3, dtype=torch.float64)
    full[:2, :2], full[2:, 2:] = wg[:2], wg[2:]
    grad_out = torch.randn(1, 4, 5, 6, generator=gen, dtype=torch.float64)
    _, (gx, goff, gmask, _) = mmcv_reference(x, offset, mask, full, None, grad_out, (1, 1), (1, 1), (1, 1))
    inputs = [t.clone().requires_grad_(True) for t in (x, offset, mask)]
    modulated_deform_conv2d(*inputs, wg, impl="torchvision").backward(grad_out)
    for got, want in zip(inputs, (gx, goff, gmask)):
        torch.testing.assert_close(got.grad, want, atol=1e-10, rtol=0)

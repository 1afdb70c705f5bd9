"""dbnetpp.ops.deform_conv: the fast PyTorch DCNv2 against torchvision and hand-computed values."""

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

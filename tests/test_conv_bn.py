"""``dbnetpp.ops.conv_bn`` and ``dbnetpp.models.layers``: the convolution and train-mode BatchNorm
operators equal torch's own kernels bit for bit, and the layers call them only while
``torch.compile`` traces CPU training."""

import copy

import pytest
import torch
import torch.nn.functional as F

import dbnetpp
from dbnetpp.models import layers
from dbnetpp.ops import conv_bn

pytestmark = pytest.mark.skipif(conv_bn._OPS is None, reason="torch.library.custom_op needs torch >= 2.4")


def value_and_grads(fn, inputs, seed=1):
    """fn()'s output and the gradients of <output, a fixed random tensor> for ``inputs``."""
    out = fn()
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return [out, *torch.autograd.grad(out, inputs, weights)]


def leaves(*shapes, dtype=torch.float32, seed=0, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        t = torch.randn(shape, generator=gen, dtype=dtype)
        if channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t.requires_grad_())
    return out


def assert_bitwise(got, want):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.stride() == w.stride()
        assert torch.equal(g, w), (g - w).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "stride,padding,dilation,groups,bias",
    [(1, 1, 1, 1, True), (2, 1, 1, 1, False), (1, 2, 2, 2, True), (2, 0, 1, 1, True)],
)
def test_convolution_equals_conv2d_bitwise(dtype, channels_last, stride, padding, dilation, groups, bias):
    x, w, b = leaves((2, 4, 11, 9), (6, 4 // groups, 3, 3), (6,), dtype=dtype, channels_last=channels_last)
    b = b if bias else None
    inputs = [x, w] + ([b] if bias else [])
    want = value_and_grads(lambda: F.conv2d(x, w, b, stride, padding, dilation, groups), inputs)
    got = value_and_grads(
        lambda: conv_bn.convolution(x, w, b, [stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0], groups), inputs
    )
    assert_bitwise(got, want)


@pytest.mark.parametrize("stride,padding,output_padding", [(2, 0, 0), (2, 1, 1), (3, 1, 0)])
def test_convolution_equals_conv_transpose2d_bitwise(stride, padding, output_padding):
    x, w, b = leaves((2, 4, 5, 6), (4, 3, 2, 2), (3,))
    want = value_and_grads(lambda: F.conv_transpose2d(x, w, b, stride, padding, output_padding), [x, w, b])
    got = value_and_grads(
        lambda: conv_bn.convolution(x, w, b, [stride] * 2, [padding] * 2, [1, 1], True, [output_padding] * 2, 1),
        [x, w, b],
    )
    assert_bitwise(got, want)


def test_convolution_skips_gradients_nobody_needs():
    """A frozen input (the images) gets no gradient, as with F.conv2d: None, not zeros."""
    (w,) = leaves((3, 2, 3, 3))
    x = torch.randn(1, 2, 6, 6)
    out = conv_bn.convolution(x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    out.sum().backward()
    assert x.grad is None and torch.equal(w.grad, torch.autograd.grad(F.conv2d(x, w, padding=1).sum(), w)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine,running", [(True, True), (False, True), (True, False)])
def test_batch_norm_train_equals_batch_norm_bitwise(dtype, channels_last, affine, running):
    """Output, input / weight / bias gradients and the moved running statistics (momentum 0.1,
    unbiased variance) equal ``F.batch_norm(training=True)``'s."""
    x, weight, bias = leaves((3, 5, 4, 7), (5,), (5,), dtype=dtype, channels_last=channels_last)
    weight, bias = (weight, bias) if affine else (None, None)
    stats = [torch.randn(5, dtype=dtype), torch.rand(5, dtype=dtype) + 0.5] if running else [None, None]
    theirs, ours = copy.deepcopy(stats), copy.deepcopy(stats)
    inputs = [x] + ([weight, bias] if affine else [])
    want = value_and_grads(lambda: F.batch_norm(x, *theirs, weight, bias, True, 0.1, 1e-5), inputs)
    got = value_and_grads(lambda: conv_bn.batch_norm_train(x, weight, bias, *ours, 0.1, 1e-5), inputs)
    assert_bitwise(got, want)
    if running:
        assert_bitwise(ours, theirs)
        assert not torch.equal(ours[0], stats[0])  # moved


def test_operators_pass_opcheck():
    """Schemas, fake (shape-only) implementations and autograd registrations agree with the kernels."""
    x, w, b = leaves((2, 3, 8, 8), (4, 3, 3, 3), (4,), dtype=torch.float64)
    torch.library.opcheck(torch.ops.dbnetpp.convolution.default, (x, w, b, [1, 1], [1, 1], [1, 1], False, [0, 0], 1))
    wt = leaves((3, 2, 2, 2), dtype=torch.float64)[0]
    torch.library.opcheck(torch.ops.dbnetpp.convolution.default, (x, wt, None, [2, 2], [0, 0], [1, 1], True, [0, 0], 1))
    g, beta = leaves((3,), (3,), dtype=torch.float64)
    args = (x, g, beta, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), 0.1, 1e-5)
    torch.library.opcheck(torch.ops.dbnetpp.batch_norm_train.default, args)


# --- when the layers take the operators --------------------------------------------------------


def traced_targets(model, images, **compile_options):
    """The call targets of the graph dynamo captures from one forward (and backward) of ``model``."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        out = torch.compile(model, fullgraph=True, backend=backend, **compile_options)(images)
        if model.training:
            sum(v.sum() for v in out.values()).backward()
    finally:
        torch._dynamo.reset()
    (gm,) = graphs
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def torch_layers(targets):
    """The targets that are torch's convolutions or BatchNorm (not dbnetpp's operators)."""
    names = ("conv2d", "conv_transpose2d", "batch_norm")
    return [t for t in targets if "dbnetpp" not in t and any(n in t for n in names)]


def tiny(mode):
    torch.manual_seed(0)
    model = dbnetpp.build_model("dbnetpp_resnet18_dcnv2_tiny")
    return model.train() if mode == "train" else model.eval()


def test_layers_are_torch_nn_subclasses_with_the_same_state():
    model = tiny("train")
    ours = [m for m in model.modules() if isinstance(m, (layers.Conv2d, layers.ConvTranspose2d, layers.BatchNorm2d))]
    assert len(ours) > 20
    assert all(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.BatchNorm2d)) for m in ours)
    conv = layers.Conv2d(3, 4, 3, padding=1)
    assert list(conv.state_dict()) == list(torch.nn.Conv2d(3, 4, 3, padding=1).state_dict())


@pytest.mark.slow
def test_compiled_cpu_training_calls_the_operators():
    """Train mode on the CPU: every convolution and BatchNorm of the model is one of the registered
    operators (none left for inductor to re-layout or decompose), the running statistics and
    batch counters move as in eager."""
    model = tiny("train")
    counts = {m: sum(isinstance(x, m) for x in model.modules()) for m in (torch.nn.Conv2d, torch.nn.ConvTranspose2d)}
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    twin = copy.deepcopy(model)
    images = torch.randn(2, 3, 64, 64)
    targets = traced_targets(model, images)
    convs = counts[torch.nn.Conv2d] + counts[torch.nn.ConvTranspose2d]
    assert sum("dbnetpp.convolution" in t for t in targets) == convs
    assert sum("dbnetpp.batch_norm_train" in t for t in targets) == len(bns)
    assert not torch_layers(targets)
    twin(images)
    for mine, theirs in zip(model.buffers(), twin.buffers()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert all(int(m.num_batches_tracked) == 1 for m in bns)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["eval", "switched off", "autocast"])
def test_layers_keep_torch_kernels_elsewhere(case):
    """Eval mode, ``set_eager_kernels(False)`` and autocast trace torch's own functions."""
    model = tiny("eval" if case == "eval" else "train")
    images = torch.randn(1, 3, 64, 64)
    try:
        if case == "switched off":
            conv_bn.set_eager_kernels(False)
        if case == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                targets = traced_targets(model, images)
        elif case == "eval":
            with torch.no_grad():
                targets = traced_targets(model, images)
        else:
            targets = traced_targets(model, images)
    finally:
        conv_bn.set_eager_kernels(True)
    assert not [t for t in targets if "dbnetpp.convolution" in t or "dbnetpp.batch_norm" in t]
    assert len(torch_layers(targets)) > 20

"""The deformable convolution as a registered operator, whole-graph ``torch.compile``, FakeTensor
training, ``torch.export``.

Compile cost on the 2-core test machine decides the matrix: ``torch.compile(model,
fullgraph=True)`` of every name in ``MODEL_NAMES`` in train (forward + DBLoss + backward) and
eval mode, with both DCN implementations where the model has DCN layers. Inductor's C++ builds
take minutes per model graph here, so by default inductor compiles the operator alone (with
numerics) and the tiny DBNet++'s training step; the two names checked outside this repository
(R50-DCNv2 DBNet++ and the tiny DBNet++) run through AOTAutograd (``aot_eager``: forward and
backward traced with fake tensors, the graphs inductor would get) with numerics against eager,
and every other name is captured whole by dynamo (``backend="eager"``, fullgraph) in both modes.
``DBNETPP_COMPILE_TESTS=inductor`` runs the two names through inductor,
``DBNETPP_COMPILE_TESTS=full`` every name (tens of minutes).
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dbnetpp
from dbnetpp import engine
from dbnetpp.loss import DBLoss
from dbnetpp.models.dbnet import _TABLE, MODEL_NAMES, set_dcn_impl
from dbnetpp.models.dcn import ModulatedDeformConv2d
from dbnetpp.ops import deform_conv

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(deform_conv._OP is None, reason="torch.library.custom_op needs torch >= 2.4"),
]

# "inductor": inductor with numerics for the two names checked outside; "full": for every name
LEVEL = os.environ.get("DBNETPP_COMPILE_TESTS", "")
FULL = LEVEL == "full"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (no recompile limit reached across tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
R50_DCN = "dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015"
TINY_DCN = "dbnetpp_resnet18_dcnv2_tiny"
IMPLS = ("fast", "torchvision")
OP = torch.ops.dbnetpp.modulated_deform_conv2d.default if deform_conv._OP is not None else None


def op_inputs(dtype=torch.float64, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 6, 7, generator=gen, dtype=dtype)
    # integers and halves: taps at exactly -1 (mmcv's rule), 0, H-1, H and between
    offset = torch.randint(-3, 4, (2, 18, 6, 7), generator=gen).to(dtype) / 2
    mask = torch.rand(2, 9, 6, 7, generator=gen, dtype=dtype)
    weight = torch.randn(3, 4, 3, 3, generator=gen, dtype=dtype)
    bias = torch.randn(3, generator=gen, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (x, offset, mask, weight, bias)]


def grads_of(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in inputs]


# --- the operator ------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    """torch.library.opcheck: schema, fake implementation, autograd registration and AOT
    dispatch agree with the real kernels (forward and the backward operator)."""
    args = (*op_inputs(), [1, 1], [1, 1], [1, 1], impl)
    torch.library.opcheck(OP, args)
    x, offset, mask, weight, _ = op_inputs(requires_grad=False)
    grad = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    backward = torch.ops.dbnetpp.modulated_deform_conv2d_backward.default
    torch.library.opcheck(backward, (grad, x, offset, mask, weight, [1, 1], [1, 1], [1, 1], impl, [True] * 4))
    # gradients not asked for come back empty, the fake agrees
    grads = backward(grad, x, offset, mask, weight, [1, 1], [1, 1], [1, 1], impl, [False, True, False, True])
    assert [tuple(g.shape) for g in grads] == [(0,), tuple(offset.shape), (0,), tuple(weight.shape)]


@pytest.mark.parametrize("impl", IMPLS)
def test_one_node_forward_and_backward(impl):
    """The layer's forward and backward graphs each hold the operator once and nothing that asks
    the device for a value (no nonzero / item / data-dependent shape), also at offsets of -1."""
    from functorch.compile import aot_function, make_boxed_func

    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm)

    fn = aot_function(
        lambda *a: deform_conv.modulated_deform_conv2d(*a, impl=impl), fw_compiler=keep, bw_compiler=keep
    )
    out = fn(*op_inputs(dtype=torch.float32))
    out.sum().backward()
    forward, backward = graphs
    targets = [[str(n.target) for n in g.graph.nodes if n.op == "call_function"] for g in (forward, backward)]
    assert targets[0].count("dbnetpp.modulated_deform_conv2d.default") == 1
    assert targets[1].count("dbnetpp.modulated_deform_conv2d_backward.default") == 1
    for t in targets[0] + targets[1]:
        assert not any(bad in t for bad in ("nonzero", "aten.item", "_local_scalar_dense", "torchvision")), t


@pytest.mark.parametrize("impl", IMPLS)
def test_inductor_op_matches_eager_at_minus_one(impl):
    """The operator alone under inductor: output and every gradient equal eager's (float32),
    with many taps exactly at -1 (mmcv's offset-gradient rule)."""
    inputs = op_inputs(dtype=torch.float32)

    def fn(*a):
        return deform_conv.modulated_deform_conv2d(*a, impl=impl).relu() * 2

    grad_out = torch.randn(2, 3, 6, 7, generator=torch.Generator().manual_seed(3))
    want, want_grads = grads_of(fn, inputs, grad_out)
    got, got_grads = grads_of(torch.compile(fn, fullgraph=True), inputs, grad_out)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_autograd_function_fallback_matches_the_operator(impl, monkeypatch):
    """The torch < 2.4 path (autograd.Function over the same kernels) gives the operator's numbers."""
    inputs = op_inputs()
    grad_out = torch.randn(2, 3, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def fn(*a):
        return deform_conv.modulated_deform_conv2d(*a, impl=impl)

    want, want_grads = grads_of(fn, inputs, grad_out)
    monkeypatch.setattr(deform_conv, "_OP", None)
    got, got_grads = grads_of(fn, inputs, grad_out)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


# --- whole models ------------------------------------------------------------------------------


def batch(size=64, n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=gen)
    targets = {
        "shrink_map": (torch.rand(n, size, size, generator=gen) < 0.2).float(),
        "shrink_mask": (torch.rand(n, size, size, generator=gen) < 0.9).float(),
        "thr_map": 0.3 + 0.4 * torch.rand(n, size, size, generator=gen),
        "thr_mask": (torch.rand(n, size, size, generator=gen) < 0.5).float(),
    }
    return images, targets


def randomize_offsets(model, seed=0):
    """Offsets of a few pixels and spread masks, so the sampling really deforms (zero-initialised
    ``conv_offset`` would leave every DCN a plain convolution)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ModulatedDeformConv2d):
                m.conv_offset.weight.copy_(0.05 * torch.randn(m.conv_offset.weight.shape, generator=gen))
                m.conv_offset.bias.copy_(torch.randn(m.conv_offset.bias.shape, generator=gen))


def build(name, impl, mode):
    torch.manual_seed(0)
    model = dbnetpp.build_model(name)
    if not (name == R50_DCN and mode == "train"):
        # R50-DCNv2 in train mode at 64 px with feature-dependent offsets is chaotic: a 1e-6
        # input change moves prob_logits by ~100 % in eager alone; it keeps mmcv's zero init there
        randomize_offsets(model)
    set_dcn_impl(model, impl)
    return model.train() if mode == "train" else model.eval()


def run(model, mode, backend):
    """Outputs (and in train mode the losses and parameter gradients) of one step of ``model``,
    compiled whole with ``backend`` (None: eager)."""
    images, targets = batch()
    model = copy.deepcopy(model)
    net = model if backend is None else torch.compile(model, fullgraph=True, backend=backend)
    if mode == "eval":
        with torch.no_grad():
            return {"prob": net(images)}, {}
    criterion = DBLoss()
    criterion = criterion if backend is None else torch.compile(criterion, fullgraph=True, backend=backend)
    outputs = net(images)
    losses = criterion(outputs, targets)
    losses["loss"].backward()
    values = {**{k: v.detach() for k, v in outputs.items()}, **{k: v.detach() for k, v in losses.items()}}
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    return values, grads


def assert_close_to_eager(got, want, tolerance, what):
    """max |got - want| <= tolerance x max |want|, per tensor (a tensor of zeros must stay zeros)."""
    assert set(got) == set(want), what
    for key, w in want.items():
        err = (got[key].float() - w.float()).abs().max().item()
        scale = w.float().abs().max().item()
        assert err <= tolerance * scale, f"{what} {key}: max error {err:.3g} vs max |value| {scale:.3g}"


def check_against_eager(name, impl, mode, backend):
    """Outputs within 1e-4 and parameter gradients within 1e-3 of eager (relative to each
    tensor's largest value). Inductor meets that in train mode because on the CPU the model's
    convolutions and BatchNorms reach it as eager's kernels (``dbnetpp.ops.conv_bn``): a fresh
    R50-DCNv2 moves by 0.4 % between any two float32 summation orders (README)."""
    model = build(name, impl, mode)
    want, want_grads = run(model, mode, None)
    got, got_grads = run(model, mode, backend)
    assert_close_to_eager(got, want, 1e-4, f"{name} {impl} {mode} {backend} output")
    if mode == "train":
        assert len(want_grads) == sum(p.requires_grad for p in model.parameters())
        # every gradient against its own largest value, the head's pre-BatchNorm biases included
        # (exactly 0 on both sides: dbnetpp.models.head)
        assert_close_to_eager(got_grads, want_grads, 1e-3, f"{name} {impl} {mode} {backend} grad")


def has_dcn(name):
    return any(_TABLE[name][1].get("dcn_stages", ()))


def matrix():
    """(name, impl, mode, backend) cases; see the module docstring."""
    cases = []
    for name in MODEL_NAMES:
        # dynamo capture alone (backend "eager") sees the same graph for both implementations
        both = has_dcn(name) and (FULL or LEVEL == "inductor" or name in (TINY_DCN, R50_DCN))
        impls = IMPLS if both else ("fast",)
        for impl in impls:
            for mode in ("train", "eval"):
                if FULL or (LEVEL == "inductor" and name in (TINY_DCN, R50_DCN)):
                    backends = ["inductor"]
                elif name in (TINY_DCN, R50_DCN):
                    backends = ["aot_eager"]
                else:
                    backends = ["eager"]
                cases += [pytest.param(name, impl, mode, b, id=f"{name}-{impl}-{mode}-{b}") for b in backends]
    return cases


def distinct_rows(cases):
    """Names whose table rows are equal build the same modules: one of them stands for the others
    (their graphs are the same graph) unless the full matrix runs."""
    if FULL:
        return cases
    seen, kept = set(), []
    for case in cases:
        name, impl, mode, backend = case.values
        key = (row_of(name), impl, mode)
        if key not in seen:
            seen.add(key)
            kept.append(case)
    return kept


def row_of(name):
    """The builder and its effective keyword values (defaults filled in) for ``name``."""
    import inspect

    from dbnetpp.models.dbnet import _dbnet

    builder, values = _TABLE[name]
    defaults = {k: p.default for k, p in inspect.signature(_dbnet).parameters.items() if p.default is not p.empty}
    return builder, repr(sorted({**defaults, **values}.items()))


@pytest.mark.slow
@pytest.mark.parametrize("name,impl,mode,backend", distinct_rows(matrix()))
def test_model_compiles_whole(name, impl, mode, backend):
    """``torch.compile(model, fullgraph=True)``: no graph break; AOT / inductor equal eager within
    1e-4 (outputs, losses) and 1e-3 (parameter gradients) of each tensor's largest value."""
    if backend == "eager":  # dynamo capture only: one graph each for the model and the loss
        model = build(name, impl, mode)
        images, targets = batch(size=64, n=1)
        net = torch.compile(model, fullgraph=True, backend="eager")
        if mode == "eval":
            with torch.no_grad():
                assert net(images).shape == (1, 64, 64)
        else:
            losses = torch.compile(DBLoss(), fullgraph=True, backend="eager")(net(images), targets)
            losses["loss"].backward()
            assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        return
    check_against_eager(name, impl, mode, backend)


def test_every_name_is_in_the_matrix():
    """Every name is compiled, itself or through a name that builds the same network (same
    builder and effective values), in both modes."""
    assert {case.values[0] for case in matrix()} == set(MODEL_NAMES)
    kept = {(row_of(c.values[0]), c.values[2]) for c in distinct_rows(matrix())}
    assert kept == {(row_of(name), mode) for name in MODEL_NAMES for mode in ("train", "eval")}
    # the two names checked outside run with both implementations and numerics against eager
    checked = {(c.values[0], c.values[1], c.values[2]) for c in distinct_rows(matrix()) if c.values[3] != "eager"}
    assert checked >= {(n, i, m) for n in (TINY_DCN, R50_DCN) for i in IMPLS for m in ("train", "eval")}


# --- FakeTensor training step, torch.export -------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_training_step_under_fake_tensors(impl):
    """Engine forward, DBLoss, backward and an SGD step of R50-DCNv2 DBNet++ at 2x3x640x640 on
    fake tensors (shapes only): nothing in the step needs a value from the device."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        model = dbnetpp.build_model(R50_DCN)
        set_dcn_impl(model, impl)
        model.train()
        optimizer = engine.build_optimizer(model, "sgd", lr=0.007, weight_decay=1e-4)
        images = torch.randn(2, 3, 640, 640)
        targets = {k: torch.rand(2, 640, 640) for k in ("shrink_map", "shrink_mask", "thr_map", "thr_mask")}
        with engine.autocast_context(images.device, None):
            outputs = model(images)
            losses = DBLoss()(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        params = list(model.parameters())
    assert isinstance(losses["loss"], FakeTensor) and losses["loss"].shape == ()
    assert outputs["prob_logits"].shape == (2, 640, 640)
    assert all(isinstance(p.grad, FakeTensor) and p.grad.shape == p.shape for p in params)
    dcn = [m for m in model.modules() if isinstance(m, ModulatedDeformConv2d)]
    assert len(dcn) == 13 and all(m.conv_offset.weight.grad is not None for m in dcn)


def test_export_keeps_the_dcn_as_one_node():
    """torch.export of the eval model: one ``dbnetpp.modulated_deform_conv2d`` node per DCN layer,
    no torchvision op, and the exported program computes the model's output."""
    torch.manual_seed(0)
    model = dbnetpp.build_model(TINY_DCN).eval()
    randomize_offsets(model)
    images = torch.randn(1, 3, 64, 64)
    program = torch.export.export(model, (images,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    layers = sum(isinstance(m, ModulatedDeformConv2d) for m in model.modules())
    assert layers == 4
    assert targets.count("dbnetpp.modulated_deform_conv2d.default") == layers
    assert not [t for t in targets if "deform" in t and "dbnetpp" not in t]
    with torch.no_grad():
        torch.testing.assert_close(program.module()(images), model(images), atol=1e-5, rtol=1e-5)


# --- examples/train.py --compile, Detector(compile=True) ------------------------------------------

# The tiny preset (DBNet++ with DCNv2, channels_last) on a few 64 px synthetic images. The tests
# compile with AOTAutograd (aot_eager): the same whole graphs, forward and backward, as inductor
# gets, without minutes of C++ builds.
TINY_RUN = [
    "--preset", "tiny", "--synthetic-images", "8", "2", "--train-size", "64", "--test-scale", "128", "64",
    "--batch-size", "4", "--no-progress", "--eval-interval", "100",
]  # fmt: skip


@pytest.fixture(scope="module")
def train_module():
    from helpers import load_train_script

    return load_train_script("dbnetpp_train_script_compile")


def run_main(train_module, *argv):
    return train_module.main(train_module.get_args_parser().parse_args([str(a) for a in argv]))


def checkpoint_of(work):
    from dbnetpp.checkpoint import read_checkpoint

    return read_checkpoint(work / "last.pth")


@pytest.mark.slow
def test_train_script_compile_one_epoch_bf16(train_module, tmp_path):
    """``--compile`` with ``--amp bf16`` and channels_last trains one epoch of the tiny preset; the
    checkpoint has the model's own keys (no ``_orig_mod.``) and loads strictly."""
    from dbnetpp.meters import read_jsonl

    parser = train_module.get_args_parser()
    assert parser.parse_args([]).compile is None
    assert parser.parse_args(["--compile"]).compile == "inductor"
    work = tmp_path / "compiled"
    run_main(train_module, *TINY_RUN, "--epochs", "1", "--amp", "bf16", "--compile", "aot_eager", "--work-dir", work)
    state = checkpoint_of(work)["model"]
    model = dbnetpp.build_model("dbnetpp_resnet18_dcnv2_tiny")
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state)
    train = [r for r in read_jsonl(work / "log.jsonl") if r["type"] == "train"]
    assert train and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)


@pytest.mark.slow
def test_train_script_compiled_resume_equals_straight_run(train_module, tmp_path, monkeypatch):
    """A compiled run killed in epoch 1 and resumed (compiled) ends where a straight compiled run
    does: the same checkpoint, the same weights."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [*TINY_RUN, "--epochs", "2"]
    run_main(train_module, *common, "--compile", "aot_eager", "--work-dir", straight)
    real = train_module.train_one_epoch

    def killed_in_epoch_1(*args, **kwargs):
        if args[5] == 1:
            raise KeyboardInterrupt("simulated kill during epoch 1")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", killed_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run_main(train_module, *common, "--compile", "aot_eager", "--work-dir", resumed)
    monkeypatch.undo()
    run_main(train_module, *common, "--compile", "aot_eager", "--work-dir", resumed, "--resume", resumed / "last.pth")
    a, b = checkpoint_of(straight), checkpoint_of(resumed)
    assert a["epoch"] == b["epoch"] == 1 and a["global_step"] == b["global_step"] == 4
    assert set(a["model"]) == set(dbnetpp.build_model(TINY_DCN).state_dict())
    moved = 0.0
    for key, value in a["model"].items():
        if value.is_floating_point():
            assert (value - b["model"][key]).abs().max().item() <= 1e-6, key
        else:
            assert torch.equal(value, b["model"][key]), key
    for state in a["optimizer"]["state"].values():  # Adam's moments (the tiny preset's optimiser)
        moved = max([moved] + [v.abs().max().item() for k, v in state.items() if k != "step"])
    assert moved > 0  # the optimizer did step


def test_detector_compile(monkeypatch):
    """``Detector(..., compile=True)`` runs the prepared network as one compiled graph (here
    through AOTAutograd) and detects what the eager detector detects."""
    import numpy as np

    from dbnetpp import Detector

    backends = []
    real_compile = torch.compile

    def aot_eager_compile(model, **options):
        backends.append(options)
        return real_compile(model, **{**options, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", aot_eager_compile)
    torch.manual_seed(0)
    net = dbnetpp.build_model(TINY_DCN).eval()
    randomize_offsets(net)
    image = (np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)
    eager = Detector(net, test_scale=(128, 64))
    compiled = Detector(net, test_scale=(128, 64), compile=True)
    assert backends == [{"fullgraph": True}]
    (want,), _ = eager.predict_maps([image])
    (got,), _ = compiled.predict_maps([image])
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.slow
def test_train_script_compile_under_ddp(tmp_path):
    """``torchrun --nproc_per_node 2 examples/train.py --compile``: the module inside DDP is
    compiled, one epoch runs on both ranks and the checkpoint has the model's own keys."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    work = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(root / "examples" / "train.py"), *TINY_RUN, "--batch-size", "2", "--epochs", "1",
        "--compile", "aot_eager", "--work-dir", str(work),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checkpoint = checkpoint_of(work)
    assert checkpoint["config"]["run"]["world_size"] == 2
    assert set(checkpoint["model"]) == set(dbnetpp.build_model(TINY_DCN).state_dict())


# --- benchmarks/compile_numerics.py --------------------------------------------------------------


def test_compile_numerics_benchmark_compares_eager_variants():
    """The benchmark that measures how far eager float32 moves from itself (float64, 1 thread,
    channels_last, the other DCN implementation): one JSON line per comparison, real numbers,
    and the head's pre-BatchNorm biases (exact gradient 0) named as below the floor."""
    root = Path(__file__).resolve().parents[1]
    args = ["--names", TINY_DCN, "--impls", "fast", "--modes", "train", "eval", "--sizes", "64", "--no-inductor"]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "compile_numerics.py"), *args],
        capture_output=True, text=True, timeout=600, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    header, *rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert header["cpu"]["cpu"] and "isa" in header["cpu"]
    tags = ["float64", "1 thread", "channels_last", "impl torchvision"]
    assert [(r["mode"], r["against_eager_float32"]) for r in rows] == [(m, t) for m in ("train", "eval") for t in tags]
    for row in rows:
        assert row["name"] == TINY_DCN and row["size"] == 64
        # the tiny DBNet++ is well conditioned: float32 variants stay close
        assert max(row["outputs"].values()) < 1e-3, row
    float64 = rows[0]
    assert max(float64["outputs"].values()) > 0  # a real comparison: float32 is not float64
    outputs = {"prob_logits", "thr_map", "binary_map", "loss", "loss_prob", "loss_thr", "loss_db"}
    assert set(float64["outputs"]) == outputs
    assert float64["n_grads"] == sum(p.requires_grad for p in dbnetpp.build_model(TINY_DCN).parameters())
    assert {"det_head.binarize.3.bias", "det_head.threshold.3.bias"} <= set(float64["below_floor"])
    assert set(rows[len(tags)]["outputs"]) == {"prob"}


@pytest.mark.slow
def test_inductor_training_step_equals_eager():
    """The tiny DBNet++'s training step (forward, DBLoss, backward) compiled by inductor: outputs
    within 1e-4 and every gradient within 1e-3 of eager. With inductor's own convolution layout and
    BatchNorm (``set_eager_kernels(False)``) this fails: the outputs land 7e-5 off instead of
    1.2e-7, and two gradients miss 1e-3."""
    check_against_eager(TINY_DCN, "fast", "train", "inductor")

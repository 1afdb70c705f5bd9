"""ONNX export (torch dynamo exporter, opset 19) checked in onnxruntime against PyTorch.

Findings these tests pin down (torch 2.14.1, onnxruntime 1.32): the DCN-free models export to
standard operators; DBNet++ R50-DCNv2 exports its 13 deformable convolutions as ONNX
``DeformConv`` nodes, which onnxruntime runs on the CPU, with dynamic N/H/W, matching PyTorch
to ~1e-5 with real (random) offsets.
"""

import numpy as np
import pytest
import torch

from dbnetpp.cli import main
from dbnetpp.export import INPUT_NAME, OUTPUT_NAME, check_onnx, count_ops, export_onnx
from dbnetpp.models.dbnet import build_model
from dbnetpp.models.dcn import ModulatedDeformConv2d


def needs_onnx():
    """onnxruntime for the tests that run a file (and onnxscript, which the dynamo exporter
    uses): skipped without them, while the argument checks below run everywhere."""
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnxruntime")

TOLERANCE = 1e-4


def randomize_batchnorm(model, generator):
    """Non-trivial running statistics, so BN folding in the exported graph is exercised."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=generator))
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=generator))


def run_onnx(path, images):
    session = needs_onnx().InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    return session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]


def test_cli_export_of_a_dcn_free_checkpoint(tmp_path, capsys):
    """``dbnetpp export-onnx --check`` on a dbnetpp checkpoint; then the file at other shapes."""
    needs_onnx()
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = build_model("dbnet_resnet18_tiny").eval()
    randomize_batchnorm(net, g)
    weights = tmp_path / "tiny.pth"
    torch.save({"model": net.state_dict(), "model_name": net.name, "config": {}, "epoch": 0}, weights)
    out = tmp_path / "tiny.onnx"

    argv = ["export-onnx", "--weights", weights, "--out", out, "--height", "64", "--width", "64", "--check"]
    status = main([str(a) for a in argv])
    stdout = capsys.readouterr().out
    assert status == 0, stdout
    assert "0 DeformConv" in stdout
    diff = float(stdout.rsplit("max |onnx - torch| = ", 1)[1].split()[0])
    assert diff <= TOLERANCE

    ops = count_ops(out)
    assert "DeformConv" not in ops and ops["Conv"] >= 20
    # dynamic batch, height and width (multiples of 32)
    images = torch.randn(2, 3, 96, 160, generator=g)
    got = run_onnx(out, images)
    with torch.no_grad():
        want = net(images).numpy()
    assert got.shape == (2, 96, 160)
    assert np.abs(got - want).max() <= TOLERANCE
    assert want.std() > 0.05  # a non-trivial map, not a constant


@pytest.fixture(scope="module")
def dcn_model():
    """DBNet++ R50-DCNv2 with random offset/mask convolutions: the sampling really deforms."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    net = build_model("dbnetpp_resnet50_dcnv2").eval()
    randomize_batchnorm(net, g)
    for m in net.modules():
        if isinstance(m, ModulatedDeformConv2d):
            m.conv_offset.weight.data.normal_(0.0, 0.02, generator=g)
            m.conv_offset.bias.data.normal_(0.0, 1.0, generator=g)
    return net


@pytest.mark.slow
def test_dcn_model_exports_deformconv_and_runs_in_onnxruntime(dcn_model, tmp_path):
    needs_onnx()
    impls = [m.impl for m in dcn_model.modules() if isinstance(m, ModulatedDeformConv2d)]
    path = export_onnx(dcn_model, tmp_path / "dcn.onnx", height=64, width=64, opset=19)
    ops = count_ops(path)
    assert ops.get("DeformConv") == 13  # conv2 of every block in layers 2-4
    # the export switched a copy to torchvision's operator, not the caller's model
    assert [m.impl for m in dcn_model.modules() if isinstance(m, ModulatedDeformConv2d)] == impls

    g = torch.Generator().manual_seed(2)
    for shape in [(1, 3, 64, 64), (2, 3, 96, 128)]:
        images = torch.randn(*shape, generator=g)
        assert check_onnx(path, dcn_model, images) <= TOLERANCE

    # the offsets matter: the same network with its DCN offsets zeroed differs from the ONNX result
    flat = build_model("dbnetpp_resnet50_dcnv2").eval()
    flat.load_state_dict(dcn_model.state_dict())
    for m in flat.modules():
        if isinstance(m, ModulatedDeformConv2d):
            # channels 0-17 are the offsets (dy, dx per tap), 18-26 the mask logits: keep the masks
            m.conv_offset.weight.data[:18].zero_()
            m.conv_offset.bias.data[:18].zero_()
    images = torch.randn(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        undeformed = flat(images).numpy()
        deformed = dcn_model(images).numpy()
    got = run_onnx(path, images)
    assert np.abs(got - deformed).max() <= TOLERANCE
    assert np.abs(got - undeformed).max() > 100 * TOLERANCE


def test_export_argument_errors(dcn_model, tmp_path, monkeypatch):
    """Checked before anything is exported: runs without onnx / onnxruntime installed."""
    with pytest.raises(ValueError, match="opset >= 19"):
        export_onnx(dcn_model, tmp_path / "old.onnx", height=64, width=64, opset=17)
    with pytest.raises(ValueError, match="multiples of 32"):
        export_onnx(dcn_model, tmp_path / "odd.onnx", height=60, width=64)
    # the dynamo exporter (with optimize=) needs torch >= 2.6 (the package supports torch >= 2.1 otherwise)
    monkeypatch.setattr(torch, "__version__", "2.4.1+cpu")
    with pytest.raises(RuntimeError, match=r"torch >= 2\.6.*2\.4\.1"):
        export_onnx(dcn_model, tmp_path / "old_torch.onnx", height=64, width=64)
    assert not (tmp_path / "old_torch.onnx").exists()


def test_cli_export_errors(tmp_path, capsys):
    missing = tmp_path / "missing.pth"
    assert main(["export-onnx", "--weights", str(missing), "--out", str(tmp_path / "m.onnx")]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.pth" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1

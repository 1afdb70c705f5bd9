"""Lower-precision CPU inference (``dbnetpp.quantize``): int8 through ONNX Runtime, bf16 through autocast.

- ``SampledDeformConv2d`` (the DCN as grid sampling + a plain conv, the form the int8 export uses)
  against the DCN layer itself, to float32 precision;
- int8 and bf16 probability maps of ``dbnet_resnet18_tiny`` overfitted in the test session
  (``test_detector.train_tiny_checkpoint``) against float32, and its detections;
- save / load of the calibrated file, calibration folders, every CLI path, clear errors.

int8 tests skip without onnxruntime or with torch < 2.6 (the exporter); bf16 ones without native bf16.
"""

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dbnetpp import quantize
from dbnetpp.cli import main
from dbnetpp.detector import Detector
from dbnetpp.models.dbnet import build_model
from dbnetpp.models.dcn import ModulatedDeformConv2d

sys.path.insert(0, str(Path(__file__).parent))
from test_detector import best_ious, synthetic_set, train_tiny_checkpoint  # noqa: E402

TORCH_VERSION = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


int8_available = TORCH_VERSION >= (2, 6) and _has("onnxruntime") and _has("onnx") and _has("onnxscript")
needs_int8 = pytest.mark.skipif(not int8_available, reason="int8 needs onnxruntime, onnx, onnxscript and torch >= 2.6")
needs_bf16 = pytest.mark.skipif(not quantize.has_native_bf16(), reason="this CPU has no native bf16")

# Measured on the overfitted tiny model (MinMax calibration on 2 unseen synthetic images): the mean
# |int8 - fp32| of the probability map is 0.0012-0.0017 on unseen images and 0.0074 on the training
# image, whose overconfident logits lie far outside the calibrated range at a few word borders (max
# 0.86 there); 0.28 % of its pixels change side of the 0.3 binarisation threshold (0.03-0.07 % on
# unseen ones). The bounds keep a margin of about 1.4x; a broken quantization (wrong scales, lost
# channels) is off by 0.1 or more.
INT8_MEAN_BOUND = 0.01
INT8_FLIP_BOUND = 0.004
# bf16 autocast: mean 0.0005, max 0.015 measured
BF16_MEAN_BOUND = 0.002
BF16_MAX_BOUND = 0.05


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.getbasetemp() / "trained_tiny")


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A random-weight tiny checkpoint, for the error paths (no training needed)."""
    torch.manual_seed(0)
    net = build_model("dbnet_resnet18_tiny")
    path = tmp_path_factory.mktemp("untrained") / "tiny.pth"
    torch.save({"model": net.state_dict(), "model_name": net.name}, path)
    return path


@pytest.fixture(scope="module")
def images():
    """The training image (0) and three unseen ones."""
    data = synthetic_set(4)
    return [data[i]["image"] for i in range(4)]


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory):
    """Two unseen synthetic images of the training distribution as files."""
    directory = tmp_path_factory.mktemp("calibration")
    data = synthetic_set(7)
    for i in (5, 6):
        cv2.imwrite(str(directory / f"calib_{i}.png"), data[i]["image"])
    (directory / "notes.txt").write_text("not an image: skipped by suffix\n")
    return directory


@pytest.fixture(scope="module")
def int8_file(trained, calibration_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "tiny_int8.onnx"
    assert main(["quantize", "--weights", str(trained), "--out", str(out), "--calibration", str(calibration_dir)]) == 0
    return out


# ------------------------------------------------------------------------- the DCN as sampling + conv


@pytest.mark.parametrize("stride,padding,dilation,bias", [(1, 1, 1, False), (2, 1, 1, True), (1, 2, 2, False)])
def test_sampled_deform_conv_matches_the_dcn(stride, padding, dilation, bias):
    torch.manual_seed(0)
    dcn = ModulatedDeformConv2d(6, 5, 3, stride=stride, padding=padding, dilation=dilation, bias=bias).eval()
    with torch.no_grad():
        dcn.conv_offset.weight.normal_(std=0.5)  # offsets of a few pixels, many taps outside the image
        dcn.conv_offset.bias.normal_(std=1.0)
        if bias:
            dcn.bias.normal_()
    x = torch.randn(2, 6, 11, 14)
    sampled = quantize.SampledDeformConv2d(dcn).eval()
    with torch.no_grad():
        expected = dcn(x)
        got = sampled(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_sampled_deform_conv_in_a_scaled_small_model():
    """The tiny DBNet++'s DCNs scale their offsets (offset_and_mask is overridden): kept."""
    torch.manual_seed(0)
    net = build_model("dbnetpp_resnet18_dcnv2_tiny").eval()
    for m in net.modules():
        if isinstance(m, ModulatedDeformConv2d):
            torch.nn.init.normal_(m.conv_offset.weight, std=0.5)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = net(x)
        swapped = quantize._sampled_dcns(net)
        got = net(x)
    assert swapped == sum(isinstance(m, quantize.SampledDeformConv2d) for m in net.modules()) > 0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------- int8 accuracy


@needs_int8
@pytest.mark.slow
def test_int8_prob_map_and_detections_close_to_fp32(trained, images, int8_file):
    fp32 = Detector(trained)
    int8 = Detector(int8_file, precision="int8")  # settings from the file
    assert int8.model_name == fp32.model_name == "dbnet_resnet18_tiny" and int8.test_scale == fp32.test_scale
    assert isinstance(int8.model, quantize.Int8Model)
    maps32, scales32 = fp32.predict_maps(images)
    maps8, scales8 = int8.predict_maps(images)
    assert scales8 == scales32
    for a, b in zip(maps32, maps8):
        assert b.dtype == np.float32 and b.shape == a.shape
        assert float(np.abs(a - b).mean()) <= INT8_MEAN_BOUND
        assert float(((a > 0.3) != (b > 0.3)).mean()) <= INT8_FLIP_BOUND
    # the words of the training image are found as in float32 (test_detector's criterion)
    sample = synthetic_set()[0]
    cared = [p for p, ignored in zip(sample["polygons"], sample["ignore"]) if not ignored]
    assert (best_ious(int8.detect(sample["image"]), cared) >= 0.5).mean() >= 0.8

    # the file's batch of 1 is run image by image: a batch equals single images
    batch = int8.model(torch.stack([int8.preprocess(images[1])[0]] * 2))
    np.testing.assert_array_equal(batch[0].numpy(), batch[1].numpy())


@needs_int8
@pytest.mark.slow
def test_int8_default_synthetic_calibration_and_dcn_model(tmp_path):
    """Built-in synthetic calibration on a DBNet++ with DCNs (random weights: only that it runs
    and stays near float32; accuracy is shown on the trained model above)."""
    torch.manual_seed(0)
    net = build_model("dbnetpp_resnet18_dcnv2_tiny").eval()
    for m in net.modules():
        if isinstance(m, ModulatedDeformConv2d):
            torch.nn.init.normal_(m.conv_offset.weight, std=0.05)
    ckpt = tmp_path / "dcn_tiny.pth"
    torch.save({"model": net.state_dict(), "model_name": net.name}, ckpt)
    fp32 = Detector(ckpt, test_scale=(256, 128))
    out = quantize.quantize_detector(fp32, tmp_path / "dcn_int8.onnx", count=2)
    import onnx

    graph = onnx.load(out).graph
    ops = {node.op_type for node in graph.node}
    assert "DeformConv" not in ops and "GridSample" in ops and "QuantizeLinear" in ops
    assert_int8_graph_layout(graph, residual_adds=8)  # ResNet-18: 8 blocks
    int8 = Detector(out, precision="int8")
    assert int8.test_scale == (256, 128) and int8.model_name == net.name
    image = synthetic_set(1)[0]["image"]
    a, b = fp32.predict_maps([image])[0][0], int8.predict_maps([image])[0][0]
    assert float(np.abs(a - b).mean()) <= 0.02


def assert_int8_graph_layout(graph, residual_adds):
    """What ``quantize_detector`` keeps float32 and what it quantizes, read off the QDQ graph."""
    from onnx import numpy_helper

    producer = {out: node for node in graph.node for out in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {t.name for t in graph.initializer}
    ops = [node.op_type for node in graph.node]
    # the neck's shortcuts that would run as float32 ConvTranspose are not exported; the ASF
    # attention's spatial pooling is a GlobalAveragePool (ReduceMean is slow on NHWC maps)
    assert "ConvTranspose" not in ops and "GlobalAveragePool" in ops
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    for node in graph.node:
        if node.op_type == "ReduceMean":  # only the mean over the channels of the pooled (N, C, 1, 1) vector
            assert sorted(int(a) % 4 for a in constants[node.input[1]].ravel()) == [1]
    # every DCN's sampling grid is computed in float32 from the offset conv's (dequantized) output:
    # no Q/DQ on the way, where uint8 steps over the absolute positions would be whole pixels
    grids = [node for node in graph.node if node.op_type == "GridSample"]
    for grid_sample in grids:
        stack, seen = [producer[grid_sample.input[1]]], set()
        while stack:
            node = stack.pop()
            if node.name in seen or node.op_type == "Conv":
                continue
            seen.add(node.name)
            if node.op_type == "DequantizeLinear":  # the offset conv's output: offsets of a few pixels
                assert [producer[node.input[0]].op_type, producer[producer[node.input[0]].input[0]].op_type] == [
                    "QuantizeLinear", "Conv"
                ], f"{node.name} quantizes a grid"
                continue
            assert node.op_type != "QuantizeLinear", f"{node.name} quantizes a grid"
            if node.op_type != "Shape":
                stack.extend(producer[i] for i in node.input if i in producer)
        # ... and its samples are quantized before the mask multiplies them (QLinearMul)
        assert [c.op_type for c in consumers[grid_sample.output[0]]] == ["QuantizeLinear"]
    # the logits conv and everything after it are float32: float weights, no Q/DQ to the output
    node = producer[graph.output[0].name]
    while node.op_type != "Conv":
        assert node.op_type not in ("QuantizeLinear", "DequantizeLinear")
        node = producer[node.input[0]]
    assert node.input[1] in initializers, "the last conv's weight is float32"
    # residual sums run on uint8 (both inputs dequantized: ONNX Runtime fuses them into QLinearAdd)
    quantized_adds = [
        n for n in graph.node
        if n.op_type == "Add" and all(i in producer and producer[i].op_type == "DequantizeLinear" for i in n.input)
    ]  # fmt: skip
    assert len(quantized_adds) >= residual_adds


@needs_int8
def test_reduce_range_follows_the_cpu_and_the_option(untrained, tmp_path, monkeypatch):
    """7-bit weights where the CPU has no VNNI (auto) or when asked; recorded in the file."""
    import onnx
    from onnx import numpy_helper

    def weight_range(path):
        graph = onnx.load(path).graph
        weights = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
        return min(int(w.min()) for w in weights), max(int(w.max()) for w in weights)

    fp32 = Detector(untrained, test_scale=(128, 64))
    monkeypatch.setattr(quantize, "has_vnni", lambda: False)
    reduced = quantize.quantize_detector(fp32, tmp_path / "reduced.onnx", count=1)
    assert quantize.Int8Model(reduced).settings["reduce_range"] is True
    low, high = weight_range(reduced)
    assert -64 <= low and high <= 64
    monkeypatch.setattr(quantize, "has_vnni", lambda: True)
    full = quantize.quantize_detector(fp32, tmp_path / "full.onnx", count=1)
    assert quantize.Int8Model(full).settings["reduce_range"] is False
    assert max(abs(v) for v in weight_range(full)) == 127  # symmetric per-channel: each channel's max
    assert main(["quantize", "--weights", str(untrained), "--out", str(tmp_path / "cli.onnx"), "--reduce-range"]) == 0
    assert quantize.Int8Model(tmp_path / "cli.onnx").settings["reduce_range"] is True


# ---------------------------------------------------------------------------------------------- bf16


@needs_bf16
@pytest.mark.slow
def test_bf16_prob_map_close_to_fp32(trained, images):
    fp32, bf16 = Detector(trained), Detector(trained, precision="bf16")
    for a, b in zip(fp32.predict_maps(images[:2])[0], bf16.predict_maps(images[:2])[0]):
        assert b.dtype == np.float32
        assert float(np.abs(a - b).mean()) <= BF16_MEAN_BOUND and float(np.abs(a - b).max()) <= BF16_MAX_BOUND


def test_bf16_refused_without_native_bf16(monkeypatch, untrained):
    monkeypatch.setattr(quantize, "has_native_bf16", lambda: False)
    with pytest.raises(ValueError, match="native bf16"):
        Detector(untrained, precision="bf16")


# -------------------------------------------------------------------------------------------- errors


def test_precision_errors(untrained, tmp_path):
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        Detector(untrained, precision="int4")
    with pytest.raises(ValueError, match="calibration images are for precision 'int8'"):
        Detector(untrained, calibration=tmp_path)
    with pytest.raises(ValueError, match="for the CPU"):
        Detector(untrained, precision="int8", device="cuda")
    with pytest.raises(FileNotFoundError, match="calibration images not found"):
        quantize.calibration_images(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no image"):
        quantize.calibration_images(tmp_path)


def test_int8_without_onnxruntime(monkeypatch, untrained, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'dbnetpp\[onnx\]'"):
        Detector(untrained, precision="int8")
    image = tmp_path / "img.png"
    cv2.imwrite(str(image), synthetic_set(1)[0]["image"])
    for argv in (
        ["detect", str(image), "--weights", str(untrained), "--out", str(tmp_path / "out"), "--precision", "int8"],
        ["quantize", "--weights", str(untrained), "--out", str(tmp_path / "q.onnx")],
    ):
        capsys.readouterr()
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "onnxruntime" in err and len(err.splitlines()) == 1


@needs_int8
@pytest.mark.slow
def test_int8_file_errors(int8_file, tmp_path):
    with pytest.raises(ValueError, match="holds an int8 'dbnet_resnet18_tiny' model, but model 'dbnetpp_resnet50"):
        Detector(int8_file, model="dbnetpp_resnet50_dcnv2", precision="int8")
    with pytest.raises(ValueError, match="use precision 'int8'"):
        Detector(int8_file)
    with pytest.raises(ValueError, match="already calibrated"):
        Detector(int8_file, precision="int8", calibration=tmp_path)
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["prob_map"])],
        "other",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("prob_map", TensorProto.FLOAT, [1, 3, 32, 32])],
    )
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(other))
    with pytest.raises(ValueError, match="not an int8 model written by dbnetpp quantize"):
        Detector(other, precision="int8")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ValueError, match="onnxruntime cannot load it"):
        Detector(broken, precision="int8")


# ----------------------------------------------------------------------------------------------- CLI


@needs_int8
@pytest.mark.slow
def test_cli_detect_and_eval_int8(int8_file, trained, calibration_dir, tmp_path, capsys):
    data = synthetic_set(2)
    root = data.write_icdar(tmp_path / "icdar", "test")
    image = tmp_path / "img_1.png"
    cv2.imwrite(str(image), data[0]["image"])
    fp32_out, int8_out = tmp_path / "fp32", tmp_path / "int8"
    assert main(["detect", str(image), "--weights", str(trained), "--out", str(fp32_out), "--no-vis"]) == 0
    argv = ["detect", str(image), "--weights", str(int8_file), "--out", str(int8_out), "--precision", "int8"]
    assert main(argv) == 0
    assert (int8_out / "res_img_1.txt").is_file() and (int8_out / "vis_img_1.png").is_file()
    lines32 = (fp32_out / "res_img_1.txt").read_text().splitlines()
    lines8 = (int8_out / "res_img_1.txt").read_text().splitlines()
    assert abs(len(lines8) - len(lines32)) <= 1 and len(lines8) >= 5

    capsys.readouterr()
    assert main(["eval", "--data", str(root), "--weights", str(int8_file), "--precision", "int8"]) == 0
    hmean8 = _hmean(capsys.readouterr().out)
    assert main(["eval", "--data", str(root), "--weights", str(trained)]) == 0
    hmean32 = _hmean(capsys.readouterr().out)
    assert abs(hmean8 - hmean32) <= 0.1 and hmean8 > 0.3

    # a float32 checkpoint calibrated on the fly on the same folder: the same graph as the saved file
    out = tmp_path / "fly"
    argv = ["detect", str(image), "--weights", str(trained), "--out", str(out), "--no-vis", "--precision", "int8",
            "--calibration", str(calibration_dir)]
    assert main(argv) == 0
    assert (out / "res_img_1.txt").read_text() == (int8_out / "res_img_1.txt").read_text()

    # errors: one line, exit 1
    for argv in (
        ["detect", str(image), "--weights", str(int8_file), "--out", str(tmp_path / "x")],
        ["detect", str(image), "--weights", str(int8_file), "--out", str(tmp_path / "x"), "--precision", "int8",
         "--model", "dbnetpp_resnet50_dcnv2"],
        ["detect", str(image), "--weights", str(trained), "--out", str(tmp_path / "x"), "--calibration",
         str(calibration_dir)],
        ["quantize", "--weights", str(trained), "--out", str(tmp_path / "q.onnx"), "--calibration",
         str(tmp_path / "nothing")],
    ):
        capsys.readouterr()
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1


def _hmean(stdout: str) -> float:
    import json

    line = [t for t in stdout.splitlines() if t.startswith("{")][-1]
    return float(json.loads(line)["hmean"])


# ------------------------------------------------------------------ R50 training for the accuracy figure


def test_r50_training_multipliers_fold_into_the_plain_network(tmp_path):
    """benchmarks/train_r50_synthetic.py trains the R50-DCNv2 DBNet++ with the small DBNet++'s
    learning-rate multipliers; ``--fold`` must give the plain network (MMOCR's keys) with the same
    probability map, whatever the weights (here random, offsets and attention far from their init)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train_r50_synthetic", Path(__file__).resolve().parents[1] / "benchmarks" / "train_r50_synthetic.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    torch.manual_seed(0)
    trained = script.build_with_multipliers(script.R50_DCN).eval()
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "conv_offset" in name or "asf_attn" in name:
                p.normal_(std=0.5)
    source, target = tmp_path / "run.pth", tmp_path / "plain.pth"
    torch.save({"model": trained.state_dict(), "model_name": script.R50_DCN}, source)
    record = script.fold(str(source), str(target))
    assert record["max_abs_map_diff"] <= 1e-4
    plain = build_model(script.R50_DCN).eval()
    plain.load_state_dict(torch.load(target, weights_only=True)["model"], strict=True)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        want, got = trained(x), plain(x)
    assert (got - want).abs().max().item() <= 1e-4 and want.std().item() > 0
    # the multipliers changed something to fold: the plain network with the stored weights differs
    assert any(k.endswith("parametrizations.weight.original") for k in trained.state_dict())

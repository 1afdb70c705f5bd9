"""Lower-precision CPU inference: int8 through ONNX Runtime's static quantization, bf16 through autocast.

int8 (``Detector(weights, precision="int8")``, ``dbnetpp quantize``):

1. the network is prepared for inference (``dbnetpp.inference.prepare_for_inference``: BatchNorm
   folded, threshold branch dropped) and exported to ONNX with a fixed batch of 1 and dynamic
   height / width, traced under ``no_grad`` (the inference forms of the modules) and without the
   neck's transposed-convolution shortcuts (float32-only in ONNX Runtime). Each deformable
   convolution is exported as its bilinear sampling (one ONNX ``GridSample`` of every kernel tap
   into a (N, C, kh*Ho, kw*Wo) map, times the modulation mask) followed by a plain ``Conv`` with
   kernel = stride = (kh, kw) (``SampledDeformConv2d``), so the quantizer covers the DCN's matrix
   product too (ONNX Runtime's ``DeformConv`` kernel is float32 only); spatial means become
   ``GlobalAveragePool``;
2. ``onnxruntime.quantization.quantize_static`` (QDQ format, per-channel symmetric int8 weights,
   uint8 activations with ranges calibrated by MinMax on a handful of images run through the
   detector's own test preprocessing) quantizes the convolutions and the ops between them
   (``QUANTIZED_OPS``), so activations stay uint8 from one convolution to the next. Float32 stay:
   the DCN sampling grids (absolute positions) and the head's last convolution with everything
   after it, so the logits and the sigmoid probability map are float32;
3. the quantized graph, with the model name, test scale and post-processing settings in its
   metadata, is one ``.onnx`` file: ``Detector`` and ``dbnetpp detect|eval`` load it without
   recalibrating, and refuse it for a different architecture.

The calibration images are the user's (a folder or a list of files / BGR arrays, a handful is
enough) or, by default, ``DEFAULT_CALIBRATION_IMAGES`` built-in synthetic text images
(``dbnetpp.data.SyntheticText`` with a seed of its own, neither the training nor the held-out one).

bf16 (``precision="bf16"``): the prepared model run under ``torch.autocast("cpu", torch.bfloat16)``
(the fast deformable convolution computes in float32 inside it), probability map returned in float32.
Only on CPUs with native bf16 instructions (AVX512_BF16 or AMX); elsewhere a ValueError says so.

Needs the ``onnx`` extra (``pip install 'dbnetpp[onnx]'``: onnx, onnxscript, onnxruntime) and
torch >= 2.6 (the exporter) for int8; bf16 needs neither.
"""

import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_CALIBRATION_IMAGES",
    "PRECISIONS",
    "BF16Model",
    "Int8Model",
    "SampledDeformConv2d",
    "calibration_images",
    "check_precision",
    "has_native_bf16",
    "has_vnni",
    "is_int8_file",
    "load_int8",
    "quantize_detector",
    "require_native_bf16",
    "require_onnxruntime",
]

PRECISIONS = ("fp32", "bf16", "int8")
DEFAULT_CALIBRATION_IMAGES = 8
SYNTHETIC_CALIBRATION_SEED = 20_000  # neither the tiny preset's training (0) nor held-out (10_000) seed
FORMAT_KEY = "dbnetpp_format"
FORMAT = "dbnetpp-int8/1"
SETTINGS_KEY = "dbnetpp_settings"
# Quantized ONNX ops: the convolutions and matrix products, and the element-wise and data-movement
# ops between them (residual and top-down sums, DCN masks and ASF weights, ReLU, pooling, upsampling,
# concatenation), so that activations stay uint8 from one convolution to the next instead of being
# dequantized around each float32 op (R50-DCNv2 at 1024x1824: 1.73 s with convolutions only, 1.33 s
# with these; measured with ONNX Runtime's profiler on an AVX-512 VNNI EPYC, 2 threads).
QUANTIZED_OPS = (
    "Conv", "ConvTranspose", "MatMul", "Mul", "Add", "Concat", "Resize", "Relu", "MaxPool", "GlobalAveragePool",
    "Sigmoid",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

PathLike = Union[str, "os.PathLike[str]"]
CalibrationInput = Union[None, PathLike, Sequence[Union[PathLike, np.ndarray]]]


def check_precision(precision: str) -> str:
    """``precision`` if it is one of ``PRECISIONS``, else a ValueError listing them."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return precision


# ------------------------------------------------------------------------------------------ bf16


def has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512_BF16 or AMX-BF16), not just emulation."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(probe is not None for probe in probes):  # torch >= 2.3
        return any(bool(probe()) for probe in probes)
    from dbnetpp.cpuinfo import cpu_flags

    flags = cpu_flags()  # older torch: Linux's list of CPU flags
    return bool(flags and flags & {"avx512_bf16", "amx_bf16"})


def require_native_bf16() -> None:
    """ValueError unless ``has_native_bf16()``: emulated bf16 is slower than float32."""
    if not has_native_bf16():
        raise ValueError(
            "precision 'bf16' needs a CPU with native bf16 instructions (AVX512_BF16 or AMX); this one has "
            "neither, where bf16 would be slower than float32: use precision 'int8' or 'fp32'"
        )


class BF16Model(nn.Module):
    """``model`` (images (N, 3, H, W) -> probability map (N, H, W)) under CPU bf16 autocast; float32 out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.name = getattr(model, "name", type(model).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x).float()


# ---------------------------------------------------------------------------------- int8 export


def has_vnni() -> bool:
    """True when the CPU has int8 dot-product instructions (AVX512_VNNI, AVX_VNNI or AMX-INT8), which
    ONNX Runtime's uint8 x int8 convolutions use; False where they are absent or unknown."""
    from dbnetpp.cpuinfo import cpu_flags

    return bool((cpu_flags() or set()) & {"avx512_vnni", "avx_vnni", "amx_int8"})


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or an ImportError naming the extra to install."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(
            "precision 'int8' needs onnxruntime, which is not installed: pip install 'dbnetpp[onnx]'"
        ) from None
    return onnxruntime


class SampledDeformConv2d(nn.Module):
    """A ``ModulatedDeformConv2d`` as bilinear sampling + a plain convolution (same output).

    Every kernel tap (i, j) of output pixel (oy, ox) is sampled with ``F.grid_sample`` (bilinear,
    zeros outside: DCNv2's boundary rule) into pixel (kh*oy + i, kw*ox + j) of a (N, C, kh*Ho, kw*Wo)
    map and multiplied by its mask; a convolution with the DCN's weight, kernel = stride = (kh, kw),
    then gives (N, O, Ho, Wo). Exported to ONNX as GridSample + Mul + Conv, so an int8 quantizer
    covers the matrix product. For export and inference (no training).
    """

    def __init__(self, dcn: nn.Module) -> None:
        super().__init__()
        self.dcn = dcn  # keeps conv_offset and offset_and_mask (scaled variants included)
        kh, kw = dcn.kernel_size
        self.conv = nn.Conv2d(dcn.in_channels, dcn.out_channels, (kh, kw), stride=(kh, kw), bias=dcn.bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(dcn.weight)
            if dcn.bias is not None:
                self.conv.bias.copy_(dcn.bias)
        if dcn.deform_groups != 1:
            raise ValueError(f"SampledDeformConv2d supports deform_groups=1, got {dcn.deform_groups}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dcn = self.dcn
        kh, kw = dcn.kernel_size
        offset, mask = dcn.offset_and_mask(x)
        height, width = x.shape[2], x.shape[3]
        ho, wo = offset.shape[2], offset.shape[3]
        dy, dx = offset[:, 0::2], offset[:, 1::2]  # (N, K, Ho, Wo), tap k = i*kw + j
        dev, dt = x.device, x.dtype
        tap_y = (torch.arange(kh, device=dev, dtype=dt) * dcn.dilation[0]).repeat_interleave(kw)
        tap_x = (torch.arange(kw, device=dev, dtype=dt) * dcn.dilation[1]).repeat(kh)
        out_y = torch.arange(ho, device=dev, dtype=dt) * dcn.stride[0] - dcn.padding[0]
        out_x = torch.arange(wo, device=dev, dtype=dt) * dcn.stride[1] - dcn.padding[1]
        y = dy + tap_y.view(1, -1, 1, 1) + out_y.view(1, 1, -1, 1)
        xs = dx + tap_x.view(1, -1, 1, 1) + out_x.view(1, 1, 1, -1)
        # (N, K, Ho, Wo) -> (N, 1, kh*Ho, kw*Wo): channel i*kw + j goes to sub-pixel (i, j)
        y = F.pixel_shuffle(y, kh) if kh == kw else _tap_shuffle(y, kh, kw)
        xs = F.pixel_shuffle(xs, kh) if kh == kw else _tap_shuffle(xs, kh, kw)
        m = F.pixel_shuffle(mask, kh) if kh == kw else _tap_shuffle(mask, kh, kw)
        # align_corners=False: pixel x sits at (2x + 1) / W - 1
        grid = torch.stack(((2 * xs + 1) / width - 1, (2 * y + 1) / height - 1), dim=-1).squeeze(1)
        sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return self.conv(sampled * m)


def _tap_shuffle(t: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    n, _, ho, wo = t.shape
    return t.view(n, kh, kw, ho, wo).permute(0, 3, 1, 4, 2).reshape(n, 1, ho * kh, wo * kw)


def _sampled_dcns(model: nn.Module) -> int:
    """Replace every ModulatedDeformConv2d of ``model`` with a SampledDeformConv2d, in place."""
    from dbnetpp.models.dcn import ModulatedDeformConv2d

    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ModulatedDeformConv2d) and child.deform_groups == 1:
                setattr(parent, name, SampledDeformConv2d(child))
                count += 1
    return count


def _export_fp32(net: nn.Module, path: str, sample_dcn: bool = True) -> Any:
    """``net`` (eval, float32, CPU) -> ONNX file at ``path``: input (1, 3, 32*h, 32*w), output (1, H, W),
    spatial means as GlobalAveragePool. Returns the file's ``onnx.ModelProto``."""
    import copy

    import onnx

    from dbnetpp.export import INPUT_NAME, OUTPUT_NAME, _check_torch_version
    from dbnetpp.models.dbnet import set_dcn_impl

    _check_torch_version()
    net = copy.deepcopy(net).float().cpu().eval()
    set_dcn_impl(net, "torchvision")
    if sample_dcn:
        _sampled_dcns(net)
    _unsplit_neck(net)
    net = net.to(memory_format=torch.contiguous_format)
    dim = torch.export.Dim
    # batch 1: the prepared network specialises the batch size; Int8Model runs images one by one
    dynamic_shapes = {"x": {2: 32 * dim("h32"), 3: 32 * dim("w32")}}
    try:
        # no_grad: the inference forms of the modules (the ASF attention's projected form, which
        # has no full-size channel mean or sums) are the ones traced
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                net,
                (torch.zeros(1, 3, 128, 128),),
                dynamo=True,
                opset_version=19,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic_shapes,
                optimize=True,
                verbose=False,
            )
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"ONNX export of {getattr(net, 'name', type(net).__name__)} failed: {first}") from err
    proto = program.model_proto
    _global_average_pools(proto.graph)
    onnx.save(proto, path)
    return proto


def _unsplit_neck(net: nn.Module) -> None:
    """Drop the neck's ``UpsampledConcatConv`` shortcuts (``FPNC.split_for_inference``): they run
    as ConvTranspose, which ONNX Runtime has in float32 only (0.9 s of the R50 int8 forward),
    while the plain 3x3 convolutions of the upsampled maps they replace quantize."""
    neck = getattr(net, "neck", None)
    for name in ("asf_split", "first_smooth_split"):
        if getattr(neck, name, None) is not None:
            setattr(neck, name, None)


def _global_average_pools(graph: Any) -> int:
    """Rewrite, in the ONNX ``graph`` (in place), every ReduceMean over axes (2, 3) of a 4-D tensor with
    keepdims as GlobalAveragePool (the same values). ONNX Runtime's ReduceMean over those axes of a
    channels-last (NHWC) tensor is slow (0.15 s for the ASF attention's pooling of a 256 x 256 x 456
    map, against 2 ms as a quantized GlobalAveragePool). Returns the number of nodes rewritten."""
    from onnx import numpy_helper

    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    count = 0
    for node in graph.node:
        if node.op_type != "ReduceMean" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        axes = sorted(int(a) % 4 for a in np.asarray(constants[node.input[1]]).ravel())
        attrs = {a.name: a for a in node.attribute}
        keep = attrs["keepdims"].i if "keepdims" in attrs else 1
        if axes == [2, 3] and keep == 1 and set(attrs) <= {"keepdims", "noop_with_empty_axes"}:
            node.op_type = "GlobalAveragePool"
            del node.input[1:]
            del node.attribute[:]
            count += 1
    if count:
        used = {name for node in graph.node for name in node.input}
        unused = [t for t in graph.initializer if t.name not in used]
        for tensor in unused:  # the axes of the rewritten nodes (ONNX Runtime warns about unused ones)
            graph.initializer.remove(tensor)
    return count


def _float_nodes(graph: Any) -> List[str]:
    """Names of the nodes of the ONNX ``graph`` that stay float32:

    - from the last Conv (the head's logits) to the graph output, so the probability map is
      computed from float logits;
    - every node computing a ``GridSample``'s sampling grid (the DCN offsets plus the tap and pixel
      positions) back to the offset Conv: uint8 steps over the coordinate range (hundreds of
      pixels) would move the taps by whole pixels. The offset conv's own output stays quantized,
      like every conv's: offsets of a few pixels in 255 steps.
    """
    producer = {out: node for node in graph.node for out in node.output}
    keep: List[str] = []
    node = producer.get(graph.output[0].name)
    while node is not None:
        keep.append(node.name)
        if node.op_type in ("Conv", "ConvTranspose"):
            break
        node = next((producer[i] for i in node.input if i in producer), None)
    seen = set(keep)
    stack = [producer[n.input[1]] for n in graph.node if n.op_type == "GridSample" and n.input[1] in producer]
    while stack:
        node = stack.pop()
        if node.name in seen or node.op_type in ("Conv", "ConvTranspose"):
            continue
        seen.add(node.name)
        keep.append(node.name)
        if node.op_type != "Shape":  # a tensor's shape does not depend on its values
            stack.extend(producer[i] for i in node.input if i in producer)
    return keep


# ---------------------------------------------------------------------------------- calibration


def _natural_key(path: Path) -> List[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def calibration_images(
    calibration: CalibrationInput = None, count: int = DEFAULT_CALIBRATION_IMAGES
) -> List[np.ndarray]:
    """BGR uint8 images to calibrate on.

    ``calibration``: None (``count`` built-in synthetic text images, 640 x 640), a folder (every
    image file in it, natural order), one image file, or a sequence of image files / BGR arrays.
    Raises FileNotFoundError / ValueError naming the folder or file that gives no image.
    """
    from dbnetpp.data.icdar2015 import read_image

    if calibration is None:
        from dbnetpp.data.synthetic import SyntheticText

        source = SyntheticText(count, seed=SYNTHETIC_CALIBRATION_SEED)
        return [source[i]["image"] for i in range(count)]
    if isinstance(calibration, (str, os.PathLike)):
        where = Path(calibration)
        if where.is_dir():
            files = sorted((p for p in where.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
            if not files:
                raise ValueError(f"calibration folder {where} holds no image ({', '.join(IMAGE_SUFFIXES)})")
            return [read_image(p) for p in files]
        if not where.exists():
            raise FileNotFoundError(f"calibration images not found: {where}")
        return [read_image(where)]
    images = [item if isinstance(item, np.ndarray) else read_image(item) for item in calibration]
    if not images:
        raise ValueError("calibration: an empty list of images")
    return images


class _Reader:
    """onnxruntime ``CalibrationDataReader``: one normalised, padded image per call."""

    def __init__(self, inputs: List[np.ndarray], input_name: str) -> None:
        self._items = iter([{input_name: x} for x in inputs])

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self._items, None)

    def rewind(self) -> None:  # pragma: no cover - not used by MinMax
        pass


# ------------------------------------------------------------------------------ quantize / load


def _settings_of(detector: Any) -> Dict[str, Any]:
    post = detector.postprocessor
    return {
        "model_name": detector.model_name,
        "test_scale": list(detector.test_scale),
        "text_repr_type": post.text_repr_type,
        "mask_thr": post.mask_thr,
        "min_text_score": post.min_text_score,
        "min_text_width": post.min_text_width,
        "unclip_ratio": post.unclip_ratio,
        "epsilon_ratio": post.epsilon_ratio,
        "max_candidates": post.max_candidates,
    }


def quantize_detector(
    detector: Any,
    out: PathLike,
    calibration: CalibrationInput = None,
    *,
    sample_dcn: bool = True,
    count: int = DEFAULT_CALIBRATION_IMAGES,
    reduce_range: Optional[bool] = None,
) -> str:
    """Write the int8 model of a float32 ``dbnetpp.Detector`` to the ONNX file ``out``.

    The calibration images (see ``calibration_images``) go through the detector's test resize
    and normalisation. The file records the model name, test scale and post-processing settings
    (``load_int8``). ``sample_dcn=False`` keeps the DCNs as ONNX ``DeformConv`` in float32.
    ``reduce_range``: 7-bit weights, which ONNX Runtime advises for CPUs without VNNI (their
    uint8 x int8 kernels add pairs of products in int16, which can saturate with 8-bit weights);
    None: on when this CPU has no VNNI (``has_vnni``), since the file is usually run where it is made.
    Returns the path written (atomically: a temporary file renamed).
    """
    require_onnxruntime()
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from dbnetpp.export import INPUT_NAME
    from dbnetpp.preprocess import batch_images

    net = detector.model
    if isinstance(net, (Int8Model, BF16Model)):
        raise ValueError("quantize a float32 detector (precision 'fp32'), not an int8 or bf16 one")
    if reduce_range is None:
        reduce_range = not has_vnni()
    images = calibration_images(calibration, count)
    inputs = [batch_images([detector.preprocess(image)[0]]).numpy() for image in images]
    out = os.fspath(out)
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dbnetpp-int8-") as tmp:
        fp32 = os.path.join(tmp, "fp32.onnx")
        float_nodes = _float_nodes(_export_fp32(net, fp32, sample_dcn=sample_dcn).graph)
        staged = os.path.join(tmp, "int8.onnx")
        root_logger = logging.getLogger()  # onnxruntime.quantization logs advice through the root logger
        level = root_logger.level
        root_logger.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_static(
                    fp32,
                    staged,
                    _Reader(inputs, INPUT_NAME),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(QUANTIZED_OPS),
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=float_nodes,
                    calibrate_method=CalibrationMethod.MinMax,
                    reduce_range=bool(reduce_range),
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
                )
        finally:
            root_logger.setLevel(level)
        proto = onnx.load(staged)
        settings = dict(
            _settings_of(detector),
            calibration_images=len(images),
            sampled_dcn=bool(sample_dcn),
            reduce_range=bool(reduce_range),
        )
        meta = {FORMAT_KEY: FORMAT, SETTINGS_KEY: json.dumps(settings)}
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        partial = out + ".partial"
        onnx.save(proto, partial)
        os.replace(partial, out)
    return out


def is_int8_file(path: Any) -> bool:
    """True when ``path`` is an existing ONNX file (what ``dbnetpp quantize`` writes; ``Int8Model``
    then checks that it is one of dbnetpp's). Torch checkpoints are zip or pickle files."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return False
    if os.fspath(path).lower().endswith(".onnx"):
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    return head[:1] == b"\x08"  # an ONNX ModelProto starts with field 1 (ir_version, a varint)


class Int8Model(nn.Module):
    """An int8 ONNX Runtime session as a module: images (N, 3, H, W) float32 -> probability map (N, H, W).

    Images run one at a time (the graph has batch 1). ``threads``: ONNX Runtime's intra-op
    threads, default ``torch.get_num_threads()``. CPU only.
    """

    def __init__(self, path: PathLike, threads: Optional[int] = None) -> None:
        super().__init__()
        ort = require_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = os.fspath(path)
        try:
            self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise ValueError(f"{self.path}: onnxruntime cannot load it ({' '.join(str(err).split())[:300]})") from err
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get(FORMAT_KEY) != FORMAT:
            raise ValueError(f"{self.path}: an ONNX file, but not an int8 model written by dbnetpp quantize")
        self.settings: Dict[str, Any] = json.loads(meta.get(SETTINGS_KEY, "{}"))
        self.name = self.settings.get("model_name", "unknown")
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ValueError(f"the int8 model runs on the CPU, got an input on {x.device}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W), got shape {tuple(x.shape)}")
        batch = x.detach().float().contiguous().numpy()
        maps = [self.session.run(None, {self.input_name: batch[i : i + 1]})[0] for i in range(batch.shape[0])]
        return torch.from_numpy(np.concatenate(maps, axis=0))

    def extra_repr(self) -> str:
        return f"path={self.path!r}, model={self.name!r}"


def load_int8(path: PathLike, model: Optional[str] = None) -> Tuple[Int8Model, Mapping[str, Any]]:
    """The int8 model in ``path`` and a checkpoint-like dict of its settings (model name, test
    scale, post-processing) for ``Detector``. ``model``: the architecture asked for; a file of
    another architecture is refused with a ValueError."""
    from dbnetpp.models.dbnet import same_architecture

    net = Int8Model(path)
    stored = net.name
    if model is not None and model != stored and not same_architecture(model, stored):
        raise ValueError(f"{os.fspath(path)} holds an int8 {stored!r} model, but model {model!r} was asked for")
    s = net.settings
    checkpoint = {
        "model": {},
        "model_name": stored,
        "config": {
            "data": {"test_scale": s.get("test_scale")},
            "model": {"text_repr_type": s.get("text_repr_type"), "epsilon_ratio": s.get("epsilon_ratio")},
        },
    }
    return net, checkpoint


# ---------------------------------------------------------------------------------- Detector glue


def check_precision_request(
    precision: str, calibration: Any, weights: Any, int8_file: bool, device: Union[str, torch.device]
) -> None:
    """Refuse, before any weights are loaded, a precision this setting cannot run (ValueError /
    ImportError with the reason)."""
    check_precision(precision)
    where = os.fspath(weights) if isinstance(weights, (str, os.PathLike)) else "weights"
    if int8_file and precision != "int8":
        raise ValueError(f"{where} holds an int8 model (written by dbnetpp quantize): use precision 'int8'")
    if int8_file and calibration is not None:
        raise ValueError(f"{where} is already calibrated: give calibration images only with a float32 checkpoint")
    if precision != "int8" and calibration is not None:
        raise ValueError(f"calibration images are for precision 'int8', not {precision!r}")
    if precision != "fp32" and torch.device(device).type != "cpu":
        raise ValueError(f"precision {precision!r} is for the CPU (device 'cpu'), got device {str(device)!r}")
    if precision == "bf16":
        require_native_bf16()
    if precision == "int8":
        require_onnxruntime()


def lower_precision(detector: Any, precision: str, calibration: CalibrationInput = None) -> nn.Module:
    """The network of a float32 ``Detector`` at ``precision`` ("bf16" or "int8"; int8 calibrated now)."""
    if precision == "bf16":
        return BF16Model(detector.model)
    if precision != "int8":
        raise ValueError(f"lower_precision: expected 'bf16' or 'int8', got {precision!r}")
    with tempfile.TemporaryDirectory(prefix="dbnetpp-int8-") as tmp:
        path = quantize_detector(detector, os.path.join(tmp, "model.onnx"), calibration)
        return Int8Model(path)  # the session holds the graph in memory: the file may go

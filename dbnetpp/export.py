"""ONNX export of a detector's eval path: normalised images -> probability map.

The graph has one input ``images`` float32 (N, 3, H, W), normalised as
``dbnetpp.preprocess.normalize_image`` does (RGB, ImageNet mean/std) and zero-padded to
multiples of 32, and one output ``prob_map`` float32 (N, H, W) in (0, 1). N, H and W are
dynamic (H and W stay multiples of 32). Resizing and post-processing are not part of the graph.

Deformable convolutions (DBNet++ R50-DCNv2) are exported through
``torchvision.ops.deform_conv2d`` (``dbnetpp.ops.deform_conv.torchvision_graph``: torchvision's
operator instead of dbnetpp's own ``dbnetpp::modulated_deform_conv2d``), which torch's dynamo
exporter turns into the standard ONNX ``DeformConv`` operator (opset >= 19); onnxruntime runs it
on the CPU. A runtime
without ``DeformConv`` needs the DCN-free variant, ``dbnetpp_resnet50``.
"""

import copy
import os
import warnings
from typing import Dict, Optional, Union

import numpy as np
import torch
from torch import nn

from dbnetpp.ops.deform_conv import torchvision_graph
from dbnetpp.preprocess import MEAN_RGB, SIZE_DIVISOR, STD_RGB

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "MIN_DCN_OPSET", "check_onnx", "count_ops", "export_onnx"]

INPUT_NAME = "images"
OUTPUT_NAME = "prob_map"
MIN_DCN_OPSET = 19  # first opset with DeformConv

PathLike = Union[str, "os.PathLike[str]"]


def _for_export(model: nn.Module) -> nn.Module:
    """An eval-mode copy whose DCN layers use torchvision's operator (the exportable one)."""
    from dbnetpp.models.dbnet import set_dcn_impl

    model = copy.deepcopy(model).eval()
    set_dcn_impl(model, "torchvision")
    return model


def _num_dcn(model: nn.Module) -> int:
    from dbnetpp.models.dcn import ModulatedDeformConv2d

    return sum(isinstance(m, ModulatedDeformConv2d) for m in model.modules())


def export_onnx(
    model: nn.Module,
    path: PathLike,
    height: int = 640,
    width: int = 640,
    opset: int = 19,
    dynamic: bool = True,
) -> str:
    """Export ``model``'s eval forward to the ONNX file ``path`` (weights inside the file).

    Args:
        model: a DBNet (not modified: a copy is exported).
        height, width: size of the example input traced, pixels (multiples of 32).
        opset: ONNX opset; >= 19 when the model has deformable convolutions.
        dynamic: batch size, height and width dynamic (height/width as multiples of 32);
            otherwise the graph is fixed to (1, 3, height, width).

    Returns the path written. Raises ValueError for bad sizes / opset, RuntimeError when the
    exporter fails.
    """
    if height <= 0 or width <= 0 or height % SIZE_DIVISOR or width % SIZE_DIVISOR:
        raise ValueError(f"height and width must be positive multiples of {SIZE_DIVISOR}, got {height}x{width}")
    num_dcn = _num_dcn(model)
    if num_dcn and opset < MIN_DCN_OPSET:
        raise ValueError(
            f"the model has {num_dcn} deformable convolutions: ONNX DeformConv needs opset >= {MIN_DCN_OPSET}, "
            f"got {opset} (or export the DCN-free 'dbnetpp_resnet50')"
        )
    _check_torch_version()
    path = os.fspath(path)
    net = _for_export(model)
    example = torch.zeros(1, 3, height, width)
    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim
        # H and W as 32 * k keep the network's multiple-of-32 input check provable for the tracer
        dynamic_shapes = {"x": {0: dim("batch"), 2: SIZE_DIVISOR * dim("h32"), 3: SIZE_DIVISOR * dim("w32")}}
    try:
        with warnings.catch_warnings(), torchvision_graph():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                net,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic_shapes,
                optimize=True,
                verbose=False,
            )
    except Exception as err:  # the exporter's own errors carry long reports; keep the gist
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"ONNX export of {getattr(model, 'name', type(model).__name__)} failed: {first}") from err
    props = {
        "model_name": str(getattr(model, "name", type(model).__name__)),
        "input": f"{INPUT_NAME}: float32 (N, 3, H, W), RGB, (x - mean) / std, zero-padded to multiples of 32",
        "output": f"{OUTPUT_NAME}: float32 (N, H, W) text probability",
        "mean_rgb": ",".join(str(v) for v in MEAN_RGB),
        "std_rgb": ",".join(str(v) for v in STD_RGB),
    }
    program.model.metadata_props.update(props)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    program.save(path, external_data=False)
    return path


MIN_EXPORT_TORCH = (2, 6)  # torch.onnx.export(..., dynamo=True, optimize=...): the torch.export-based exporter of 2.6


def _check_torch_version() -> None:
    """The export path needs torch >= 2.6 (the rest of the package works from torch 2.1)."""
    release = torch.__version__.split("+")[0].split(".")
    try:
        version = (int(release[0]), int(release[1]))
    except (IndexError, ValueError):
        return  # an unusual version string: let the exporter decide
    if version < MIN_EXPORT_TORCH:
        raise RuntimeError(
            f"ONNX export needs torch >= {MIN_EXPORT_TORCH[0]}.{MIN_EXPORT_TORCH[1]} (the dynamo exporter), "
            f"this is torch {torch.__version__}; upgrade torch to export"
        )


def count_ops(path: PathLike) -> Dict[str, int]:
    """Node count per ONNX operator type in the main graph of ``path``."""
    import onnx

    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    counts: Dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def check_onnx(
    path: PathLike,
    model: nn.Module,
    images: Optional[torch.Tensor] = None,
    seed: int = 0,
) -> float:
    """Run ``path`` in onnxruntime (CPU) and ``model`` in PyTorch on the same input; returns
    max |prob_ort - prob_torch|.

    ``images``: normalised (N, 3, H, W) input; default a random (1, 3, 64, 96) one (seeded).
    Raises RuntimeError, with a plain explanation, when onnxruntime cannot load or run the
    file (e.g. a runtime without ``DeformConv``).
    """
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise RuntimeError("onnxruntime is not installed (pip install onnxruntime)") from err
    path = os.fspath(path)
    if images is None:
        images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(seed))
    net = _for_export(model)
    with torch.no_grad():
        expected = net(images).float().numpy()
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy().astype(np.float32)})
    except Exception as err:
        hint = ""
        if count_ops(path).get("DeformConv"):
            hint = (
                f" This onnxruntime ({ort.__version__}) cannot run the ONNX DeformConv operator of the "
                "deformable convolutions; export the DCN-free model 'dbnetpp_resnet50' instead."
            )
        message = " ".join(str(err).split())[:300]
        raise RuntimeError(f"onnxruntime cannot run {path}: {message}.{hint}") from err
    if got.shape != expected.shape:
        raise RuntimeError(f"{path}: onnxruntime output shape {got.shape} != PyTorch {expected.shape}")
    return float(np.abs(got - expected).max())

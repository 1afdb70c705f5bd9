"""Strict loading of MMOCR checkpoints, torchvision ResNet weights and oCLIP backbone weights.

Our module names are MMOCR's (``backbone.``, ``neck.``, ``det_head.``; torchvision names inside
the backbone; a DCN's ``conv2.weight`` / ``conv2.conv_offset.*`` as in mmcv), so neither format
needs key renaming: loading checks that every key is used, none is missing and every shape
matches, and raises a ValueError listing the offending keys otherwise. Files are read with
``torch.load(weights_only=True, map_location="cpu")``; nothing is downloaded.
"""

import os
import pickle
import re
from typing import Any, Dict, List, Mapping, Union

import torch
from torch import nn

__all__ = ["load_state_dict_file", "load_mmocr_checkpoint", "load_oclip_backbone", "load_torchvision_backbone"]

PathOrStateDict = Union[str, "os.PathLike[str]", Mapping[str, Any]]

_MAX_LISTED = 20


class _Opaque:
    """Inert stand-in for an object in a checkpoint that we never use (mmengine's ``meta`` and
    ``message_hub`` hold HistoryBuffers, numpy scalars, ...). Building it runs no code from
    the file: it only keeps the arguments it was given."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Opaque":
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _allowed_global(module: str, name: str) -> bool:
    """Globals a tensor checkpoint needs: tensor / storage rebuilders, dtypes, containers."""
    if module == "collections" and name == "OrderedDict":
        return True
    if module in ("torch._utils", "torch._tensor") and name.startswith("_rebuild_"):
        return True
    if module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)):
        return True
    return (module, name) in {("torch", "device"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
                              ("torch.nn.parameter", "Parameter"), ("torch.storage", "UntypedStorage")}


class _StandInUnpickler(pickle.Unpickler):
    """Unpickler for torch < 2.5: allow-listed globals load, every other one is ``_Opaque``."""

    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(module, name) if _allowed_global(module, name) else _Opaque


class _StandInPickle:
    """The ``pickle_module`` handed to ``torch.load``: only its ``Unpickler`` is used."""

    Unpickler = _StandInUnpickler
    load = staticmethod(pickle.load)
    __name__ = "dbnetpp_stand_in_pickle"


def load_state_dict_file(path: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]:
    """Read a checkpoint file on the CPU with ``weights_only=True`` (no arbitrary code execution).

    Checkpoints written by mmengine (MMOCR's model zoo) also pickle objects that
    ``weights_only`` refuses; each such class or function is replaced by an inert
    ``_Opaque`` so the tensors still load and nothing from the file is executed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        obj = _load_with_stand_ins(path, err)
    except Exception as err:  # not a torch file, truncated zip, ...
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({err})") from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return dict(obj)


def _load_with_stand_ins(path: str, first_error: Exception) -> Any:
    """``torch.load(weights_only=True)`` with every global it refused replaced by ``_Opaque``."""
    find_unsafe = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if find_unsafe is None:  # torch < 2.5: the same, with an allow-list unpickler of our own
        try:
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_StandInPickle)
        except Exception as err:
            raise ValueError(f"{path}: not a readable PyTorch checkpoint ({err})") from first_error
    try:
        stand_ins = [(_Opaque, name) for name in find_unsafe(path)]
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({err})") from first_error


def _as_state_dict(path_or_state_dict: PathOrStateDict) -> Dict[str, Any]:
    if isinstance(path_or_state_dict, Mapping):
        sd = dict(path_or_state_dict)
        where = "state dict"
    else:
        sd = load_state_dict_file(path_or_state_dict)
        where = os.fspath(path_or_state_dict)
    # MMOCR/mmengine checkpoints: {"meta": ..., "state_dict": {...}, "optimizer": ..., ...}
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = dict(sd["state_dict"])
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{where}: entries that are not tensors: {_listing(bad)}")
    return sd


def _listing(keys: List[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _check_keys(
    expected: Mapping[str, torch.Tensor],
    given: Mapping[str, torch.Tensor],
    what: str,
    optional: Any = (),
) -> None:
    """Raise ValueError naming missing, unexpected and mis-shaped keys (``optional`` may be missing)."""
    missing = [k for k in expected if k not in given and k not in optional]
    unexpected = [k for k in given if k not in expected]
    misshaped = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in given and given[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys ({len(misshaped)}): {_listing(misshaped)}")
    if problems:
        raise ValueError(f"cannot load {what}:\n  " + "\n  ".join(problems))


def load_mmocr_checkpoint(model: nn.Module, path_or_state_dict: PathOrStateDict) -> Dict[str, List[str]]:
    """Load an MMOCR DBNet/DBNet++ checkpoint (file path or dict, optionally wrapped in
    ``{"state_dict": ...}``) into ``model`` strictly.

    Returns ``{"loaded": keys}``. Raises ValueError listing missing / unexpected / mis-shaped keys
    (with both shapes); the model is left untouched in that case.
    """
    sd = _as_state_dict(path_or_state_dict)
    expected = model.state_dict()
    _check_keys(expected, sd, f"MMOCR checkpoint into {type(model).__name__} {getattr(model, 'name', '')}".rstrip())
    model.load_state_dict(sd, strict=True)
    return {"loaded": list(sd)}


def load_torchvision_backbone(model: nn.Module, path_or_state_dict: PathOrStateDict) -> Dict[str, List[str]]:
    """Load torchvision ResNet ImageNet weights (e.g. ``resnet50-0676ba61.pth``) into the backbone.

    ``model`` is a DBNet (its ``.backbone`` is used) or a ResNet. ``fc.*`` is ignored; a DCN's
    ``conv2.weight`` takes torchvision's ``conv2.weight`` and its ``conv_offset`` is left as it is
    (zero after init), as MMOCR does. BN ``num_batches_tracked`` may be absent (old files).
    Everything else is strict. Returns ``{"loaded", "ignored", "kept"}`` key lists (backbone names).
    """
    backbone = getattr(model, "backbone", model)
    sd = _as_state_dict(path_or_state_dict)
    ignored = [k for k in sd if k.startswith("fc.")]
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    expected = {k: v for k, v in own.items() if ".conv_offset." not in k}
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    _check_keys(expected, sd, f"torchvision ResNet weights into {type(backbone).__name__}", optional)
    result = backbone.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    kept = [k for k in own if k not in sd]
    return {"loaded": list(sd), "ignored": ignored, "kept": kept}


# CLIP's ModifiedResNet stem names -> MMOCR CLIPResNet's ``stem`` Sequential indices
_CLIP_STEM = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4", "conv3": "6", "bn3": "7"}
# oCLIP's published tools/convert2mmocr.py numbers the stem 0..5 (ReLUs not counted)
_CONTIGUOUS_STEM = {"0": "0", "1": "1", "2": "3", "3": "4", "4": "6", "5": "7"}
_PREFIXES = ("module.visual.", "visual.", "module.", "backbone.")


def _oclip_to_mmocr_names(sd: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Rename an oCLIP / CLIP ResNet-50 visual state dict to MMOCR CLIPResNet names.

    Returns ``{"state_dict", "ignored", "layout"}``; layout is "mmocr", "contiguous_stem" or "clip".
    """
    ignored: List[str] = []
    plain: Dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        name = key
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        if name.startswith("attnpool."):  # CLIP's attention pooling head: not part of the backbone
            ignored.append(key)
            continue
        if name in plain:
            raise ValueError(f"oCLIP weights: {key!r} duplicates another key after removing its prefix")
        plain[name] = value
    if any(k.split(".")[0] in _CLIP_STEM for k in plain):
        layout = "clip"  # conv1/bn1/.../bn3 stem, downsample = [(-1) pool, 0 conv, 1 BN]
        renamed = {}
        for name, value in plain.items():
            head, _, rest = name.partition(".")
            if head in _CLIP_STEM:
                name = f"stem.{_CLIP_STEM[head]}.{rest}"
            name = re.sub(r"\.downsample\.([01])\.", lambda m: f".downsample.{int(m.group(1)) + 1}.", name)
            renamed[name] = value
    elif "stem.2.weight" in plain or "stem.5.weight" in plain:
        layout = "contiguous_stem"  # stem.2 is a ReLU in MMOCR: these files count only conv/BN layers
        renamed = {}
        for name, value in plain.items():
            m = re.match(r"stem\.(\d+)\.(.*)$", name)
            if m:
                if m.group(1) not in _CONTIGUOUS_STEM:
                    raise ValueError(f"oCLIP weights: unexpected stem key {name!r}")
                name = f"stem.{_CONTIGUOUS_STEM[m.group(1)]}.{m.group(2)}"
            renamed[name] = value
    else:
        layout = "mmocr"
        renamed = plain
    return {"state_dict": renamed, "ignored": ignored, "layout": layout}


def load_oclip_backbone(model: nn.Module, path_or_state_dict: PathOrStateDict) -> Dict[str, Any]:
    """Load oCLIP ResNet-50 backbone weights (MMOCR's ``resnet50-oclip-7ba0c533.pth``) into a CLIPResNet.

    ``model`` is a DBNet with a ``CLIPResNet`` backbone (e.g. ``build_model(
    "dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015")``) or a ``CLIPResNet``. Accepted: a plain
    backbone state dict, optionally wrapped in ``{"state_dict": ...}`` and/or with a ``backbone.``
    (or ``module.visual.`` / ``visual.`` / ``module.``) prefix, in MMOCR's names (``stem.0/1/3/4/6/7``,
    ``downsample.1/2``), in the names of oCLIP's ``tools/convert2mmocr.py`` (stem numbered 0..5)
    or in CLIP's own names (``conv1``..``bn3``, ``downsample.0/1``); CLIP's ``attnpool.*`` is
    ignored. Everything else is strict (``num_batches_tracked`` may be absent): a ValueError
    lists missing, unexpected and mis-shaped keys and the model is left untouched.
    Returns ``{"loaded", "ignored"}`` key lists (backbone names) and ``"layout"``.
    """
    from dbnetpp.models.clip_resnet import CLIPResNet

    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, CLIPResNet):
        raise ValueError(
            f"oCLIP weights need a CLIPResNet backbone, got {type(backbone).__name__} "
            "(build e.g. 'dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015')"
        )
    converted = _oclip_to_mmocr_names(_as_state_dict(path_or_state_dict))
    sd = converted["state_dict"]
    expected = backbone.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    _check_keys(expected, sd, f"oCLIP backbone weights ({converted['layout']} names) into CLIPResNet", optional)
    result = backbone.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return {"loaded": list(sd), "ignored": converted["ignored"], "layout": converted["layout"]}

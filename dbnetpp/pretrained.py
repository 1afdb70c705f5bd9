"""Initialisation at the start of training, as MMOCR's runner does it.

MMOCR first runs ``init_weights`` (the backbone's ``init_cfg``: ImageNet ResNet weights from
``torchvision://resnet50`` or the oCLIP ResNet-50), then loads the config's ``load_from`` (a
whole model, e.g. the SynthText-pretrained DBNet++). ``initialize`` does the same from
``cfg.model.backbone_init`` and ``cfg.model.load_from``; a user's ``load_from`` replaces the
recipe's. Files come from ``dbnetpp.hub.download_weights`` (torch hub's checkpoint cache, one
download, hash-checked) or are local paths.

Whole-model loading follows mmengine's ``load_checkpoint(strict=False)`` with two guards: keys
are matched after dropping a DDP ``module.`` prefix and renaming MMOCR 0.x's ``bbox_head.`` to
``det_head.``; keys the file lacks keep their current values and keys the model lacks are
skipped, both reported in the returned lines and in a warning (as MMOCR logs them), but a
mis-shaped key, or a file sharing no key with the model, raises ValueError. When the whole-model
file holds every backbone weight the backbone initialisation would be overwritten anyway, so
it is skipped (same result, no ImageNet download).
"""

import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from dbnetpp.config import Config

__all__ = ["NO_PRETRAINED_HINT", "initialize", "load_whole_model", "resolve_weights"]

NO_PRETRAINED_HINT = "pass --no-pretrained to start from random weights instead"

_RENAMES = (("module.", ""), ("bbox_head.", "det_head."))  # DDP wrapper; MMOCR 0.x head name


def resolve_weights(spec: str, progress: bool = True, hint: str = NO_PRETRAINED_HINT) -> Path:
    """A local file path as it is; a published name, ``torchvision://resnetNN`` or an URL through
    ``dbnetpp.hub.download_weights`` (cache first, download once)."""
    from dbnetpp.hub import download_weights, is_published

    if os.path.isfile(spec):
        return Path(spec)
    if is_published(spec) or "://" in spec:
        return download_weights(spec, progress=progress, hint=hint)
    raise FileNotFoundError(
        f"weights {spec!r}: no such file, and not a published name or URL (`dbnetpp models` lists the names)"
    )


def _read_detector_state(path: Path) -> Tuple[str, Dict[str, torch.Tensor]]:
    """(format, state dict with our key names) of a dbnetpp / MMOCR / bare detector checkpoint,
    or of torchvision ResNet weights (format "torchvision", keys unchanged)."""
    from dbnetpp.checkpoint import detect_format
    from dbnetpp.weights import load_state_dict_file

    ckpt = load_state_dict_file(path)
    try:
        fmt = detect_format(ckpt)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    state: Mapping[str, Any] = {"dbnetpp": ckpt.get("model"), "mmocr": ckpt.get("state_dict")}.get(fmt, ckpt)
    bad = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad[:10]}")
    if fmt == "torchvision":
        return fmt, dict(state)
    renamed = {}
    for key, value in state.items():
        for old, new in _RENAMES:
            if key.startswith(old):
                key = new + key[len(old) :]
        renamed[key] = value
    return fmt, renamed


def load_whole_model(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> Dict[str, List[str]]:
    """Load a detector state dict the way mmengine's ``load_from`` does (non-strict), refusing
    mis-shaped keys and files that share no key with ``model``. Returns the key lists
    ``loaded``, ``missing`` (kept as they are) and ``unexpected`` (ignored)."""
    own = model.state_dict()
    misshaped = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if misshaped:
        shown = "; ".join(misshaped[:10]) + (f"; ... ({len(misshaped) - 10} more)" if len(misshaped) > 10 else "")
        raise ValueError(f"{source}: weights of another architecture ({len(misshaped)} mis-shaped keys): {shown}")
    loaded = [k for k in state if k in own]
    if not loaded:
        raise ValueError(f"{source}: no key in common with the model (file keys start with {sorted(state)[:5]})")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    if missing or unexpected:
        warnings.warn(
            f"{source} and the model do not match exactly (loaded as MMOCR does, strict=False): "
            f"{len(missing)} model keys not in the file (kept: {missing[:8]}), "
            f"{len(unexpected)} file keys not in the model (ignored: {unexpected[:8]})"
        )
    return {"loaded": loaded, "missing": missing, "unexpected": unexpected}


def _load_backbone(model: nn.Module, path: Path) -> Dict[str, List[str]]:
    """ImageNet (torchvision layout) or oCLIP weights into ``model.backbone``."""
    from dbnetpp import weights

    backbone = getattr(model, "backbone", model)
    if type(backbone).__name__ == "CLIPResNet":
        return weights.load_oclip_backbone(model, path)  # type: ignore[attr-defined]
    return weights.load_torchvision_backbone(model, path)


def initialize(
    model: nn.Module,
    cfg: Config,
    *,
    pretrained: bool = True,
    progress: bool = True,
    load_from: Optional[str] = None,
) -> List[str]:
    """Initialise ``model`` (freshly built, on the CPU) as MMOCR does before training.

    Applies ``cfg.model.backbone_init`` into the backbone, then the whole-model weights
    ``load_from`` (a user's: path, published name or URL), else ``cfg.model.load_from``. With
    ``pretrained=False`` the recipe's two are skipped (a user's ``load_from`` still applies).
    Downloads go to torch hub's cache: in a distributed run call this on rank 0 first, then
    on the other ranks after a barrier, so each file is fetched once.

    Returns one line per file used (what, where from, how many tensors). Raises
    WeightsUnavailableError (an OSError) when a file is neither cached nor downloadable,
    ValueError when weights do not fit the model.
    """
    lines: List[str] = []
    spec = load_from if load_from is not None else (cfg.model.load_from if pretrained else None)
    whole: Optional[Tuple[str, Path, str, Dict[str, torch.Tensor]]] = None
    if spec:
        path = resolve_weights(spec, progress)
        fmt, state = _read_detector_state(path)
        whole = (spec, path, fmt, state)

    init = cfg.model.backbone_init if pretrained else None
    if init:
        covered = False
        if whole is not None and whole[2] != "torchvision":
            backbone_keys = [k for k in model.state_dict() if k.startswith("backbone.")]
            covered = bool(backbone_keys) and all(k in whole[3] for k in backbone_keys)
        if covered:
            lines.append(f"backbone: {init} skipped (every backbone weight comes from {whole[0]})")
        else:
            path = resolve_weights(init, progress)
            result = _load_backbone(model, path)
            kept = len(result.get("kept", []))
            lines.append(
                f"backbone: {init} ({path}): {len(result['loaded'])} tensors loaded"
                + (f", {kept} kept at their initial values" if kept else "")
            )

    if whole is not None:
        spec, path, fmt, state = whole
        where = f"{spec} ({path})" if str(path) != spec else spec
        if fmt == "torchvision":
            result = _load_backbone(model, path)
            lines.append(f"backbone: {where}: {len(result['loaded'])} tensors loaded (ImageNet ResNet weights)")
        else:
            result = load_whole_model(model, state, where)
            line = f"model: {where}: {len(result['loaded'])} tensors loaded"
            if result["missing"] or result["unexpected"]:
                line += f", {len(result['missing'])} kept (not in the file), {len(result['unexpected'])} ignored"
            lines.append(line)
    return lines

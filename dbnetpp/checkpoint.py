"""Checkpoints: atomic writes, ``weights_only`` reads, format detection, RNG states.

A dbnetpp training checkpoint is a plain dict (loadable with
``torch.load(path, weights_only=True)``)::

    {"model": state_dict,          # keys identical to MMOCR's (backbone., neck., det_head.)
     "model_name": str,            # builder name, e.g. "dbnetpp_resnet50_dcnv2"
     "config": dict,               # Config.to_dict() plus run facts (world size, scaled lr)
     "epoch": int,                 # last finished epoch, 0-based (-1: none yet)
     "iter_in_epoch": int,         # batches of the next epoch already done (mid-epoch checkpoints)
     "global_step": int,           # optimiser steps done; the LR is a function of it
     "optimizer": dict, "scaler": dict,
     "rng": list,                  # one RNG-state dict per rank (python, numpy, torch, cuda)
     "sampler": list,              # one {"epoch", "position"} per rank (dbnetpp.sampler)
     "best_hmean": float}

Checkpoints written before the step-based schedule also hold ``lr_scheduler``; it is
ignored (the step count is derived from ``epoch``).

``load_model_weights`` also accepts an MMOCR checkpoint (``{"state_dict": ...}``), a
bare state dict, or torchvision ImageNet ResNet weights (backbone only).
"""

import contextlib
import glob
import os
import random
import secrets
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Union

import numpy as np
import torch
from torch import nn

PathLike = Union[str, os.PathLike]

_DETECTOR_PREFIXES = ("backbone.", "neck.", "det_head.")
_TORCHVISION_RESNET_KEYS = ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight")


_TEMP_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A file or dict that is not a checkpoint we can read."""


def save_checkpoint(state: Mapping[str, Any], paths: Union[PathLike, Sequence[PathLike]]) -> None:
    """Write ``state`` to every path in ``paths`` atomically.

    The dict is serialised once into a temporary file in the target directory, fsynced
    and moved into place with ``os.replace``; extra paths get hard links (or copies) of
    the same bytes, each also moved into place atomically. A failure at any point
    leaves every previous file untouched and removes the temporary files.
    """
    targets = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not targets:
        raise ValueError("save_checkpoint needs at least one path")
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)

    first = targets[0]
    temps: List[Path] = []
    try:
        tmp = _temp_path(first)
        temps.append(tmp)
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        for target in targets[1:]:
            extra = _temp_path(target)
            temps.append(extra)
            extra.unlink()
            try:
                os.link(tmp, extra)
            except OSError:  # other filesystem, or no hard links: copy the bytes
                _copy_synced(tmp, extra)
        for temp, target in zip(temps[1:], targets[1:]):
            os.replace(temp, target)
        os.replace(tmp, first)
    except BaseException:
        for temp in temps:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        raise
    for directory in {t.parent for t in targets}:
        _fsync_dir(directory)


def _temp_path(target: Path) -> Path:
    """A new empty ``.<name>.<random>.tmp`` beside ``target``, created with mode 0666 less the
    umask (so the checkpoint gets the same mode as any file the run writes, e.g. 0644)."""
    for _ in range(100):
        path = target.parent / f".{target.name}.{secrets.token_hex(4)}{_TEMP_SUFFIX}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(f"no free temporary file name beside {target}")


def remove_stale_temps(target: PathLike) -> List[Path]:
    """Delete the ``.<name>.*.tmp`` partial files a killed writer of ``target`` left behind (a
    finished write leaves none); returns them. One run writes its work directory at a time."""
    target = Path(target)
    removed = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.*{_TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def _copy_synced(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(1 << 24):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Load a checkpoint file onto the CPU with ``weights_only=True``.

    Raises FileNotFoundError, or CheckpointError naming the file when it is not a
    torch-serialised dict of tensors and plain Python values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of arbitrary objects, not a torch file at all
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def detect_format(ckpt: Mapping[str, Any]) -> str:
    """Which kind of weights a loaded dict holds.

    "dbnetpp" (ours: ``model`` + ``model_name``), "mmocr" (``state_dict`` with detector
    keys), "state_dict" (bare detector state dict, maybe with a DDP ``module.`` prefix),
    "torchvision" (ImageNet ResNet: ``conv1.weight``, ``layer1...``, ``fc``).
    """
    if isinstance(ckpt.get("model"), Mapping) and "model_name" in ckpt:
        return "dbnetpp"
    if isinstance(ckpt.get("state_dict"), Mapping) and _has_detector_keys(ckpt["state_dict"]):
        return "mmocr"
    if _has_detector_keys(ckpt):
        return "state_dict"
    keys = set(ckpt)
    if all(k in keys for k in _TORCHVISION_RESNET_KEYS):
        return "torchvision"
    sample = sorted(str(k) for k in keys)[:5]
    raise CheckpointError(f"unrecognised checkpoint layout; top-level keys start with {sample}")


def _has_detector_keys(state: Mapping[str, Any]) -> bool:
    return any(_strip_module(str(k)).startswith(_DETECTOR_PREFIXES) for k in state)


def _strip_module(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def load_model_weights(
    model: nn.Module, path_or_dict: Union[PathLike, Mapping[str, Any]], averaged: bool = True
) -> str:
    """Load weights (no optimiser state) into ``model`` strictly; returns the detected format.

    Accepts a dbnetpp checkpoint, an MMOCR checkpoint (model-zoo files too), a bare detector
    state dict (a DDP ``module.`` prefix is dropped), or torchvision ImageNet ResNet weights
    (backbone only), as a path or an already loaded dict. Missing, unexpected or mis-shaped keys raise a
    ValueError that names the source and the keys. A dbnetpp checkpoint of a run with weight EMA
    gives its averaged weights (the ones it evaluated) unless ``averaged=False`` (resuming).
    """
    from dbnetpp.weights import load_mmocr_checkpoint, load_state_dict_file, load_torchvision_backbone

    is_path = isinstance(path_or_dict, (str, os.PathLike))
    source = str(path_or_dict) if is_path else "state dict"
    # load_state_dict_file: weights_only, plus inert stand-ins for the foreign objects that
    # mmengine pickles into a model-zoo checkpoint's meta (nothing from the file is run).
    ckpt = load_state_dict_file(path_or_dict) if is_path else path_or_dict
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source}: expected a dict, got {type(ckpt).__name__}")
    try:
        fmt = detect_format(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    if fmt == "dbnetpp":
        name = getattr(model, "name", None)
        if name is not None and ckpt["model_name"] != name:
            warnings.warn(f"{source} holds a {ckpt['model_name']!r} model, loading into {name!r}")
        ema = ckpt.get("ema")
        use_ema = averaged and isinstance(ema, Mapping) and isinstance(ema.get("model"), Mapping)
        state: Mapping[str, Any] = ema["model"] if use_ema else ckpt["model"]
    elif fmt == "mmocr":
        state = ckpt["state_dict"]
    else:
        state = ckpt
    try:
        if fmt == "torchvision":
            load_torchvision_backbone(model, state)
        else:
            load_mmocr_checkpoint(model, {_strip_module(str(k)): v for k, v in state.items()})
    except ValueError as e:
        raise ValueError(f"{source} ({fmt} format): {e}") from e
    return fmt


# --- RNG state: plain tensors/lists so weights_only loading works --------------------


def get_rng_state() -> Dict[str, Any]:
    """This process's python / numpy / torch (and CUDA) RNG states as plain values."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: Dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``get_rng_state``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    keys = np.asarray(np_keys, dtype=np.int64).astype(np.uint32)
    np.random.set_state((np_name, keys, np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:
            count = torch.cuda.device_count()
            warnings.warn(f"checkpoint has {len(states)} CUDA RNG states for {count} devices; not restored")


# --- rotation -------------------------------------------------------------------------


def rotate_checkpoints(work_dir: PathLike, keep_last: int, prefixes: Sequence[str] = ("epoch", "iter")) -> List[Path]:
    """Delete all but the newest ``keep_last`` ``<prefix>_N.pth`` files of each prefix; returns the deleted.

    "Newest" is the largest N (MMOCR's ``max_keep_ckpts``). ``last.pth`` and ``best.pth``
    are never touched; they are separate links, so deleting a periodic file never
    removes their bytes.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    deleted: List[Path] = []
    for prefix in prefixes:
        numbered = []
        for p in Path(work_dir).glob(f"{prefix}_*.pth"):
            number = p.stem[len(prefix) + 1 :]
            if number.isdigit():
                numbered.append((int(number), p))
        for _, p in sorted(numbered)[:-keep_last]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            deleted.append(p)
    return deleted

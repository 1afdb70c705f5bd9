"""Small helpers shared by several test modules (imported as ``helpers``: pytest puts this
folder on sys.path)."""

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Iterable, Mapping, Sequence, Tuple, Union

import torch

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train.py"

KeyShapes = Union[Mapping[str, Sequence[int]], Iterable[Tuple[str, Sequence[int]]]]


def random_state_dict(keys: KeyShapes, seed: int = 0) -> Dict[str, Any]:
    """A state dict with the given keys and shapes and random values that load anywhere:
    positive running variances, integer ``num_batches_tracked``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in keys.items() if isinstance(keys, Mapping) else keys:
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.randint(0, 1000, tuple(shape), generator=g, dtype=torch.long)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(tuple(shape), generator=g) + 0.5
        else:
            sd[k] = torch.randn(tuple(shape), generator=g)
    return sd


def load_train_script(module_name: str) -> ModuleType:
    """``examples/train.py`` imported as a module named ``module_name`` (a script, not a package)."""
    spec = importlib.util.spec_from_file_location(module_name, TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

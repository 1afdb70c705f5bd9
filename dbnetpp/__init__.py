"""dbnetpp: DBNet++ scene-text detection in pure PyTorch.

The public API is imported lazily, so ``import dbnetpp`` stays cheap and the
numpy-only parts (targets, post-processing, metric) do not pull in the model.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "build_model": "dbnetpp.models.dbnet",
    "MODEL_NAMES": "dbnetpp.models.dbnet",
    "DBNet": "dbnetpp.models.dbnet",
    "load_mmocr_checkpoint": "dbnetpp.weights",
    "load_torchvision_backbone": "dbnetpp.weights",
    "load_oclip_backbone": "dbnetpp.weights",
    "normalize_image": "dbnetpp.preprocess",
    "batch_images": "dbnetpp.preprocess",
    "prepare_for_inference": "dbnetpp.inference",
    "DBLoss": "dbnetpp.loss",
    "DBPostProcessor": "dbnetpp.postprocess",
    "HmeanIoU": "dbnetpp.metric",
    "Detector": "dbnetpp.detector",
    "list_models": "dbnetpp.hub",
    "download_weights": "dbnetpp.hub",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dbnetpp' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return __all__

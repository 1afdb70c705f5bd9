"""Text detection with a trained model: image in, polygons in original-image pixels out.

``Detector`` runs MMOCR's test recipe for DBNet/DBNet++:

1. keep-ratio resize with ``dbnetpp.data.transforms.resize_for_test`` (scale (4068, 1024) by
   default: the short side goes to 1024 unless the long side would pass 4068);
2. normalise and zero-pad bottom/right to multiples of 32 (``dbnetpp.preprocess.batch_images``);
3. network -> probability map at the padded input resolution;
4. ``dbnetpp.postprocess.DBPostProcessor`` on the padded map, then every x is divided by the
   resize factor sx and every y by sy, which puts the polygons back in original-image pixels.

Example::

    from dbnetpp import Detector
    detector = Detector("dbnetpp_icdar2015.pth")            # dbnetpp or MMOCR checkpoint
    for polygon, score in detector.detect("img_1.jpg"):     # polygon: float32 (4, 2) of (x, y)
        print(score, polygon.round(1).tolist())
"""

import copy
import os
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from torch import nn

from dbnetpp.data.icdar2015 import read_image
from dbnetpp.preprocess import batch_images, pad_to_divisor

__all__ = ["DEFAULT_MODEL", "DEFAULT_TEST_SCALE", "Detection", "Detector", "ImageInput", "load_model", "read_image"]

DEFAULT_MODEL = "dbnetpp_resnet50_dcnv2"
DEFAULT_TEST_SCALE = (4068, 1024)  # (long, short) side limits of MMOCR's test resize, pixels

# (polygon float32 (K, 2) of (x, y) in original-image pixels, score in [0, 1])
Detection = Tuple[np.ndarray, float]
ImageInput = Union[str, "os.PathLike[str]", np.ndarray]
PathLike = Union[str, "os.PathLike[str]"]

_MAX_DETAIL = 400
MAX_TEST_SIDE = 8192  # test_scale sides past this are refused (a 8192x8192 input is ~1 GB of features)


def _as_bgr(image: ImageInput) -> np.ndarray:
    """Path or array -> BGR uint8 (H, W, 3). Grayscale (H, W) and BGRA (H, W, 4) are converted."""
    if not isinstance(image, np.ndarray):
        return read_image(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 BGR image, got dtype {image.dtype} with shape {image.shape}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a BGR image of shape (H, W, 3), got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image of shape {image.shape}")
    return image


def _one_line(message: str, limit: int = _MAX_DETAIL) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_dbnetpp_checkpoint(checkpoint: Mapping) -> bool:
    return isinstance(checkpoint.get("model"), Mapping)


def _stored(checkpoint: Mapping, section: str, key: str) -> Any:
    """``config[section][key]`` of a dbnetpp checkpoint, or None."""
    config = checkpoint.get("config") if _is_dbnetpp_checkpoint(checkpoint) else None
    values = config.get(section) if isinstance(config, Mapping) else None
    return values.get(key) if isinstance(values, Mapping) else None


def _stored_test_scale(checkpoint: Mapping) -> Optional[Tuple[int, int]]:
    """``config["data"]["test_scale"]`` of a dbnetpp checkpoint, if it has one."""
    scale = _stored(checkpoint, "data", "test_scale")
    if isinstance(scale, (list, tuple)) and len(scale) == 2:
        try:
            return int(scale[0]), int(scale[1])
        except (TypeError, ValueError, OverflowError):
            return tuple(scale)  # type: ignore[return-value]  # check_test_scale names it
    return None


def load_model(weights: Union[PathLike, Mapping], model: Optional[str] = None) -> nn.Module:
    """Build the network and load trained weights into it (strict key and shape check).

    Args:
        weights: path of a checkpoint file, or an already loaded checkpoint dict. Either the dbnetpp
            format (``{"model": state_dict, "model_name": ..., ...}``) or MMOCR's
            (``{"state_dict": ..., "meta": ...}``, or a bare state dict).
        model: builder name (``dbnetpp.MODEL_NAMES``). Default: the checkpoint's ``model_name``
            when it has one, else ``"dbnetpp_resnet50_dcnv2"``. Naming a different model than
            the checkpoint's own is an error.

    Returns the model in eval mode on the CPU. Raises FileNotFoundError (missing file) or
    ValueError (unreadable checkpoint, unknown model name, weights that do not fit the model),
    with the file named.
    """
    return _load_model(weights, model)[0]


def check_test_scale(test_scale: Any) -> Tuple[int, int]:
    """(long, short) as ints; ValueError naming ``test_scale`` unless both are integers in
    [1, MAX_TEST_SIDE]."""
    import numbers

    ok = (
        isinstance(test_scale, (tuple, list))
        and len(test_scale) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in test_scale)
        and all(1 <= v <= MAX_TEST_SIDE for v in test_scale)
    )
    if not ok:
        raise ValueError(
            f"test_scale must be two integer sizes (long, short) in [1, {MAX_TEST_SIDE}], got {test_scale!r}"
        )
    return int(test_scale[0]), int(test_scale[1])


def _load_model(weights: Union[PathLike, Mapping], model: Optional[str]) -> Tuple[nn.Module, Mapping]:
    from dbnetpp.checkpoint import detect_format, load_model_weights
    from dbnetpp.models.dbnet import build_model, same_architecture
    from dbnetpp.weights import load_state_dict_file

    if isinstance(weights, Mapping):
        where, checkpoint = "checkpoint", weights
    else:
        # the reader --load-from uses: MMOCR model-zoo files (foreign objects in ``meta``) load too
        where, checkpoint = os.fspath(weights), load_state_dict_file(weights)
    try:
        fmt = detect_format(checkpoint)
    except ValueError as err:
        raise ValueError(f"{where}: not a detector checkpoint ({_one_line(err)})") from err
    if fmt == "torchvision":
        raise ValueError(f"{where} holds ImageNet ResNet weights (a backbone only), not a trained detector")
    stored = checkpoint.get("model_name") if fmt == "dbnetpp" else None
    if stored is not None and model is not None and model != stored and not same_architecture(model, stored):
        raise ValueError(f"{where} holds a {stored!r} model, but model {model!r} was asked for")
    name = model or stored or DEFAULT_MODEL
    try:
        net = build_model(name)
    except ValueError as err:
        if model is not None:  # the caller's name: the message says which names exist
            raise
        raise ValueError(f"{where} names model {stored!r}: {_one_line(err)}") from None
    try:
        load_model_weights(net, checkpoint)
    except (RuntimeError, ValueError) as err:  # missing / unexpected / mis-shaped keys, unknown layout
        hint = "" if stored else " (name the model if the checkpoint holds another one)"
        raise ValueError(f"{where}: weights do not fit model {name!r}{hint}: {_one_line(err)}") from err
    return net.eval(), checkpoint


def _prepare(model: nn.Module) -> nn.Module:
    """BN folding etc. via ``dbnetpp.inference.prepare_for_inference`` when available."""
    try:
        from dbnetpp.inference import prepare_for_inference
    except ImportError:  # pragma: no cover - optional speed-up
        return model.eval()
    return prepare_for_inference(model).eval()


class Detector:
    """Scene-text detector around a trained DBNet / DBNet++.

    Args:
        weights: checkpoint path or dict (dbnetpp or MMOCR format, see ``load_model``), or an
            already built ``nn.Module`` that maps normalised (N, 3, H, W) images to probability
            maps (N, H, W) in eval mode (it is copied, not modified).
        model: builder name; default the checkpoint's own, else ``"dbnetpp_resnet50_dcnv2"``.
            The name also brings its recipe's test scale and post-processing
            (``dbnetpp.config.inference_recipe``): ``"dbnet_resnet18_fpnc_1200e_icdar2015"`` runs at
            (1333, 736) with ``epsilon_ratio`` 0.01, as MMOCR's inferencer runs that config.
        device: torch device for the network ("cpu", "cuda", ...).
        test_scale: (long, short) of the keep-ratio test resize. Default: the ``data.test_scale``
            stored in a dbnetpp checkpoint's config, else the model name's recipe's (MMOCR's
            (4068, 1024) for the default model).
        text_repr_type, mask_thr, min_text_score, min_text_width, unclip_ratio, epsilon_ratio,
            max_candidates: ``DBPostProcessor`` options with MMOCR's DBNet++ values;
            ``text_repr_type`` and ``epsilon_ratio`` default to the ones stored in a dbnetpp
            checkpoint's config, else the model name's recipe's (0.01 for DBNet, 0.002 for
            DBNet++), else "quad" and 0.002. Explicit arguments always win.
        prepare: fold BN etc. with ``dbnetpp.inference.prepare_for_inference`` (DBNet models only).
        precision: "fp32" (default), "bf16" (CPUs with native bf16 only) or "int8" (CPU, needs the
            ``onnx`` extra); ``weights`` may also be an int8 file written by ``dbnetpp quantize``
            (then precision must be "int8"). See ``dbnetpp.quantize``.
        calibration: int8 only: images to calibrate on when ``weights`` is a float32 checkpoint (a
            folder, a file or a list of files / BGR arrays); default built-in synthetic text.
        compile: ``torch.compile`` the network whole (``dbnetpp.compile.compile_model``); the first
            image of each new padded size pays the compile.
    """

    def __init__(
        self,
        weights: Union[PathLike, Mapping, nn.Module],
        model: Optional[str] = None,
        device: Union[str, torch.device] = "cpu",
        test_scale: Optional[Tuple[int, int]] = None,
        *,
        text_repr_type: Optional[str] = None,
        mask_thr: float = 0.3,
        min_text_score: float = 0.3,
        min_text_width: float = 5,
        unclip_ratio: float = 1.5,
        epsilon_ratio: Optional[float] = None,
        max_candidates: int = 3000,
        prepare: bool = True,
        precision: str = "fp32",
        calibration: Any = None,
        compile: bool = False,
    ) -> None:
        from dbnetpp import quantize
        from dbnetpp.config import inference_recipe
        from dbnetpp.models.dbnet import DBNet
        from dbnetpp.postprocess import DBPostProcessor

        recipe = None
        if test_scale is not None:  # settings are checked before the weights are read
            check_test_scale(test_scale)
        int8_file = quantize.is_int8_file(weights)
        if compile and (precision != "fp32" or int8_file):
            raise ValueError(f"compile=True runs the float32 network; it does not combine with precision={precision!r}")
        quantize.check_precision_request(precision, calibration, weights, int8_file, device)
        if isinstance(weights, nn.Module):
            net, checkpoint = copy.deepcopy(weights).eval(), {}
        elif int8_file:
            net, checkpoint = quantize.load_int8(weights, model)
            recipe = inference_recipe(model or getattr(net, "name", DEFAULT_MODEL))
        else:
            net, checkpoint = _load_model(weights, model)
            # a model name brings its recipe's test settings (MMOCR's inferencer does the same)
            recipe = inference_recipe(model or getattr(net, "name", DEFAULT_MODEL))
        if test_scale is None:
            test_scale = _stored_test_scale(checkpoint) or (recipe.test_scale if recipe else DEFAULT_TEST_SCALE)
        test_scale = check_test_scale(test_scale)
        self.model_name = getattr(net, "name", type(net).__name__)
        self.device = torch.device(device)
        net = net.to(self.device)
        if prepare and isinstance(net, DBNet):
            net = _prepare(net)  # on its device: the memory layout it picks depends on it
        self.model = net.eval()
        if compile:
            from dbnetpp.compile import compile_model

            self.model = compile_model(self.model)
        self.test_scale = (int(test_scale[0]), int(test_scale[1]))
        # explicit arguments, else the training run's (a dbnetpp checkpoint's config), else the
        # model name's recipe, else MMOCR's DBNet++ test settings
        if text_repr_type is None:
            text_repr_type = _stored(checkpoint, "model", "text_repr_type") or (
                recipe.text_repr_type if recipe else "quad"
            )
        if epsilon_ratio is None:
            stored_epsilon = _stored(checkpoint, "model", "epsilon_ratio")
            if stored_epsilon is not None:
                epsilon_ratio = float(stored_epsilon)
            else:
                epsilon_ratio = recipe.epsilon_ratio if recipe else 0.002
        self.postprocessor = DBPostProcessor(
            text_repr_type=text_repr_type,
            mask_thr=mask_thr,
            min_text_score=min_text_score,
            min_text_width=min_text_width,
            unclip_ratio=unclip_ratio,
            epsilon_ratio=epsilon_ratio,
            max_candidates=max_candidates,
        )
        self.precision = precision
        if precision != "fp32" and not int8_file:
            self.model = quantize.lower_precision(self, precision, calibration)

    @classmethod
    def from_pretrained(cls, name: str, *, progress: bool = True, **kwargs: Any) -> "Detector":
        """Detector with MMOCR's published weights ``name`` (``dbnetpp.list_models()``; MMOCR's
        aliases such as ``"DBNetpp"`` work too), downloaded once into torch hub's cache.

        The recipe's test scale and post-processing (``text_repr_type``, ``epsilon_ratio``) are
        the defaults; ``kwargs`` (any ``Detector`` argument: device, test_scale, mask_thr, ...)
        override them. Offline with an empty cache: WeightsUnavailableError (an OSError) naming
        the file, its URL and the folder to put it in.
        """
        from dbnetpp.hub import download_weights, get_weights

        entry = get_weights(name)
        if entry.kind != "detector":
            raise ValueError(f"{name!r} holds {entry.dataset} backbone weights, not a trained detector")
        hint = "give the path of a local checkpoint instead (Detector(path), dbnetpp --weights PATH)"
        path = download_weights(entry.name, progress=progress, hint=hint)
        options: Dict[str, Any] = dict(
            model=entry.arch,
            test_scale=entry.test_scale,
            text_repr_type=entry.text_repr_type,
            epsilon_ratio=entry.epsilon_ratio,
        )
        options.update(kwargs)
        return cls(path, **options)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={self.model_name!r}, device={str(self.device)!r}, "
            f"test_scale={self.test_scale}, postprocessor={self.postprocessor!r})"
        )

    def preprocess(self, image: ImageInput) -> Tuple[torch.Tensor, Tuple[float, float]]:
        """Image (path or BGR array) -> resized, normalised (3, h, w) tensor and its scale (sx, sy)."""
        from dbnetpp.data.transforms import resize_for_test
        from dbnetpp.preprocess import normalize_image

        resized, (sx, sy) = resize_for_test(_as_bgr(image), self.test_scale)
        return normalize_image(resized), (float(sx), float(sy))

    @torch.inference_mode()
    def predict_maps(self, images: Sequence[ImageInput]) -> Tuple[List[np.ndarray], List[Tuple[float, float]]]:
        """Probability maps of several images, each at its own padded (multiple-of-32) extent.

        Images are batched only with images of the same padded size (one forward pass per
        distinct size, in order of first appearance), so each map is the one the image gets
        alone: a network's receptive field would otherwise see the extra zero padding a larger
        image in the batch brings. Returns float32 maps (H_i, W_i) at the resized resolution
        and the scales (sx, sy), in input order.
        """
        if isinstance(images, (str, os.PathLike, np.ndarray)) or len(images) == 0:
            raise ValueError("predict_maps expects a non-empty sequence of images")
        tensors, scales = zip(*(self.preprocess(img) for img in images))
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault(pad_to_divisor(t.shape[1], t.shape[2]), []).append(i)
        maps: List[Optional[np.ndarray]] = [None] * len(tensors)
        for (height, width), members in groups.items():
            batch = batch_images([tensors[i] for i in members]).to(self.device)
            prob = self.model(batch).float().cpu().numpy()
            for i, p in zip(members, prob):
                # the map MMOCR post-processes for a single image: padded to multiples of 32
                maps[i] = np.ascontiguousarray(p[:height, :width])
        return maps, list(scales)

    def postprocess(self, prob_map: np.ndarray, scale: Tuple[float, float]) -> List[Detection]:
        """Probability map (H, W) at the resized resolution -> detections in original pixels."""
        # MMOCR's rescale: x * (1 / sx), y * (1 / sy); padding is bottom/right only, so no shift
        polygons, scores = self.postprocessor(prob_map, scale)
        return [(np.asarray(p, dtype=np.float32).reshape(-1, 2), float(s)) for p, s in zip(polygons, scores)]

    def detect_batch(self, images: Sequence[ImageInput]) -> List[List[Detection]]:
        """Detect text in several images (paths or BGR uint8 arrays); one forward pass per
        distinct padded size, so the result of an image does not depend on the others.

        Returns, per image, a list of ``(polygon, score)``: polygon float32 (K, 2) of (x, y) in
        that image's original pixels (K = 4 for "quad"), score the mean probability inside it.
        """
        maps, scales = self.predict_maps(images)
        return [self.postprocess(m, s) for m, s in zip(maps, scales)]

    def detect(self, image: ImageInput) -> List[Detection]:
        """Detect text in one image (path or BGR uint8 (H, W, 3) array); see ``detect_batch``."""
        return self.detect_batch([image])[0]

    def __call__(self, image: ImageInput) -> List[Detection]:
        return self.detect(image)

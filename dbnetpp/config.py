"""Training configuration: three frozen dataclasses, MMOCR's recipes by name, and presets.

The defaults are MMOCR's DBNet++ recipe
(``dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015.py``): SGD lr 0.007, momentum 0.9,
weight decay 1e-4, poly LR (power 0.9, down to 1e-7) stepped per epoch, 1200 epochs,
batch 16, evaluation and a checkpoint every 20 epochs. ``RECIPES`` holds every working
DBNet / DBNet++ config of MMOCR 1.0.1 by its config name (one row each, below);
``PRESETS`` adds the short aliases (``mmocr``) and the CPU presets: ``tiny``, the main job of
the README (a half-width ResNet-18 DBNet++ with DCNv2 and ASF trained on 256x256 synthetic text,
also named ``tiny_dbnetpp``), and ``tiny_dbnet``, the same without DCN and ASF.

CLI flags map one to one onto fields (``examples/train.py``); the resolved config is
printed, written to ``work_dir/config.json`` and stored in every checkpoint.
"""

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

OPTIMIZERS = ("sgd", "adam", "adamw")
AMP_DTYPES = ("bf16", "fp16")
DATASET_KINDS = ("icdar2015", "totaltext", "synthtext")
MAX_SIDE = 8192  # pixels: train_size, test_scale and synthetic_size past this are refused

# fields that must be integers (not bool, not 2.5) and finite numbers, per section
_INTEGERS = {
    "data": ("fix_polygons", "train_size", "workers", "synthetic_train_images", "synthetic_test_images",
             "synthetic_size", "synthetic_train_seed", "synthetic_test_seed"),
    "train": ("epochs", "batch_size", "base_batch_size", "max_iters", "warmup", "eval_interval", "save_interval",
              "save_interval_iters", "keep_last", "log_interval", "seed"),
}  # fmt: skip
_REALS = {
    "model": ("epsilon_ratio",),
    "train": ("lr", "momentum", "weight_decay", "lr_power", "lr_min", "warmup_factor", "clip_grad"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Which detector to build and how to place it on the device."""

    name: str = "dbnetpp_resnet50_dcnv2"
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm under DDP
    channels_last: bool = False  # NHWC memory format: faster convolutions on CUDA, and in oneDNN on the CPU
    # Initialisation at the start of training (MMOCR's backbone init_cfg and load_from), applied
    # unless --no-pretrained: "torchvision://resnet50", an URL, a published-weights name or a path.
    backbone_init: Optional[str] = None  # backbone weights (ImageNet, oCLIP)
    load_from: Optional[str] = None  # whole-model weights (e.g. the SynthText-pretrained model)
    # post-processing (MMOCR's DBPostprocessor)
    text_repr_type: str = "quad"  # "quad" (min-area rectangle) or "poly"
    epsilon_ratio: float = 0.002  # approxPolyDP tolerance / contour length (DBNet 0.01, DBNet++ 0.002)


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and at which sizes they are fed.

    ``root`` is an ICDAR 2015 folder; without it the model trains on
    ``SyntheticText`` and evaluates on a held-out synthetic split (another seed).
    """

    root: Optional[str] = None
    # Dataset family under ``root`` (``dbnetpp.data.open_dataset``): "icdar2015", "totaltext" or
    # "synthtext"; MMOCR's prepared textdet_{train,test}.json or the official release.
    kind: str = "icdar2015"
    # MMOCR's FixInvalidPolygon(min_poly_points=N) on the loaded ground truth (train and test);
    # None: off. The Total-Text and SynthText recipes use 4.
    fix_polygons: Optional[int] = None
    train_size: int = 640  # side of the square training crop, pixels
    # RandomCrop's smallest crop side / image side; the crop is resized to train_size (MMOCR: 0.1)
    crop_min_side_ratio: float = 0.1
    test_scale: Tuple[int, int] = (4068, 1024)  # (long, short) side limits of the test resize, pixels
    workers: int = 8  # DataLoader workers per process
    synthetic_train_images: int = 1000
    synthetic_test_images: int = 100
    synthetic_size: int = 640  # side of a synthetic image, pixels
    synthetic_words: Tuple[int, int] = (5, 14)  # (min, max) words tried per 640x640 area
    synthetic_train_seed: int = 0
    synthetic_test_seed: int = 10_000  # a different seed: held-out images


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and loop settings. ``batch_size`` is per process."""

    epochs: int = 1200
    batch_size: int = 16
    base_batch_size: int = 16  # total batch the LR below is quoted for
    scale_lr: bool = True  # lr *= total_batch / base_batch_size
    optimizer: str = "sgd"
    lr: float = 0.007
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4
    lr_power: float = 0.9  # poly schedule exponent
    lr_min: float = 1e-7  # poly schedule floor (eta_min)
    # Iteration-based training (MMOCR's SynthText pretraining): this many optimiser steps, the
    # schedule counted in iterations; ``epochs`` is then unused. None: epoch-based.
    max_iters: Optional[int] = None
    warmup: int = 0  # LinearLR warm-up length in schedule units (epochs; iterations if max_iters)
    warmup_factor: float = 0.001  # LinearLR start_factor
    clip_grad: Optional[float] = None  # max global gradient L2 norm
    amp: Optional[str] = None  # None, "bf16" or "fp16"
    eval_interval: int = 20  # epochs; 0: never evaluate
    save_interval: int = 20  # epochs; last.pth and best.pth are written regardless
    save_interval_iters: Optional[int] = None  # also write iter_N.pth every N optimiser steps
    keep_last: Optional[int] = None  # keep only the newest K epoch_N.pth / iter_N.pth (MMOCR max_keep_ckpts)
    log_interval: int = 5  # iterations
    seed: int = 0  # offset by the rank in each process
    keep_memory: bool = True  # CPU: malloc keeps freed memory (dbnetpp.allocator; ~1.5x faster steps)
    # EMA of the weights (dbnetpp.ema), evaluated and saved for inference; None: off (MMOCR's recipes)
    ema_decay: Optional[float] = None


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.validate()  # refused where it is made, not three calls later

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict (lists instead of tuples): JSON- and ``weights_only``-safe."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        """Inverse of ``to_dict``; unknown keys raise a ValueError naming them."""
        sections = {}
        for name, klass in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)):
            values = dict(d.get(name, {}))
            known = {f.name for f in dataclasses.fields(klass)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise ValueError(f"unknown {name} config keys: {unknown}")
            for key in ("test_scale", "synthetic_words"):
                if key in values:
                    values[key] = tuple(values[key])
            sections[name] = klass(**values)
        return cls(**sections).validate()

    def validate(self) -> "Config":
        """Return self, or raise ValueError naming the first bad setting."""
        t, d = self.train, self.data
        for section, names in _INTEGERS.items():
            for name in names:
                value = getattr(getattr(self, section), name)
                if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                    raise ValueError(f"{section}.{name} must be an integer, got {value!r}")
        for section, names in _REALS.items():
            for name in names:
                value = getattr(getattr(self, section), name)
                if value is not None and (
                    isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                ):
                    raise ValueError(f"{section}.{name} must be a finite number, got {value!r}")
        for name in ("test_scale", "synthetic_words"):
            value = getattr(d, name)
            if not isinstance(value, (tuple, list)) or not all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
            ):
                raise ValueError(f"data.{name} must be two integers, got {value!r}")
        if t.momentum < 0 or t.weight_decay < 0 or t.lr_power <= 0:
            raise ValueError(
                f"need momentum >= 0, weight_decay >= 0 and lr_power > 0, got {t.momentum}, {t.weight_decay}, "
                f"{t.lr_power}"
            )
        if not 32 <= d.train_size <= MAX_SIDE or max(d.test_scale) > MAX_SIDE or d.synthetic_size > MAX_SIDE:
            raise ValueError(
                f"data.train_size, test_scale and synthetic_size must be in [32, {MAX_SIDE}] pixels, got "
                f"{d.train_size}, {d.test_scale}, {d.synthetic_size}"
            )
        if len(d.synthetic_words) != 2 or not 0 <= d.synthetic_words[0] <= d.synthetic_words[1]:
            raise ValueError(f"data.synthetic_words must be (min, max) with 0 <= min <= max, got {d.synthetic_words}")
        if t.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {t.optimizer!r}")
        if t.amp is not None and t.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {AMP_DTYPES} or None, got {t.amp!r}")
        for name in ("epochs", "batch_size", "base_batch_size", "save_interval", "log_interval"):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        for name in ("max_iters", "save_interval_iters", "keep_last"):
            if getattr(t, name) is not None and getattr(t, name) < 1:
                raise ValueError(f"train.{name} must be None or >= 1, got {getattr(t, name)}")
        if t.eval_interval < 0:
            raise ValueError(f"train.eval_interval must be >= 0 (0: never), got {t.eval_interval}")
        if t.warmup < 0 or not 0 < t.warmup_factor <= 1:
            raise ValueError(f"need warmup >= 0 and 0 < warmup_factor <= 1, got {t.warmup}, {t.warmup_factor}")
        if t.warmup >= (t.max_iters or t.epochs):
            raise ValueError(f"train.warmup ({t.warmup}) must be shorter than the schedule ({t.max_iters or t.epochs})")
        if self.model.text_repr_type not in ("quad", "poly"):
            raise ValueError(f"model.text_repr_type must be 'quad' or 'poly', got {self.model.text_repr_type!r}")
        if t.lr <= 0 or t.lr_min < 0:
            raise ValueError(f"need lr > 0 and lr_min >= 0, got lr={t.lr}, lr_min={t.lr_min}")
        if t.clip_grad is not None and t.clip_grad <= 0:
            raise ValueError(f"clip_grad must be > 0, got {t.clip_grad}")
        if t.ema_decay is not None and not 0 < t.ema_decay < 1:
            raise ValueError(f"train.ema_decay must be None (off) or in (0, 1), got {t.ema_decay}")
        if not 0 < d.crop_min_side_ratio <= 1:
            raise ValueError(f"data.crop_min_side_ratio must be in (0, 1], got {d.crop_min_side_ratio}")
        if d.train_size % 32 != 0:
            raise ValueError(f"data.train_size must be a multiple of 32, got {d.train_size}")
        if len(d.test_scale) != 2 or min(d.test_scale) < 32:
            raise ValueError(f"data.test_scale must be (long, short) >= 32 pixels, got {d.test_scale}")
        if d.synthetic_train_images < 1 or d.synthetic_test_images < 1 or d.synthetic_size < 32:
            raise ValueError(
                f"synthetic sets need >= 1 image of >= 32 pixels, got {d.synthetic_train_images}/"
                f"{d.synthetic_test_images} images of {d.synthetic_size}"
            )
        if d.kind not in DATASET_KINDS:
            raise ValueError(f"data.kind must be one of {DATASET_KINDS}, got {d.kind!r}")
        if d.fix_polygons is not None and d.fix_polygons < 3:
            raise ValueError(f"data.fix_polygons must be None or >= 3 points, got {d.fix_polygons}")
        if not 0 < self.model.epsilon_ratio < 1:
            raise ValueError(f"model.epsilon_ratio must be in (0, 1), got {self.model.epsilon_ratio}")
        if d.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {d.workers}")
        return self


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# DBNet (no DCN, no ASF) on the CPU: a half-width ResNet-18 on 256x256 synthetic text, 40 steps
# per epoch. Measured on the 2-core machine (Adam, batch 8, ~0.6 s/step): lr 1e-3 first passes
# H-mean 0.8 after ~440 steps, 2e-3 after ~320, 3e-3 after ~200 (0.82 at 3.4 min, 0.91 at 6.7 min).
TINY_DBNET = Config(
    model=ModelConfig(name="dbnet_resnet18_tiny"),
    data=DataConfig(
        train_size=256,
        test_scale=(512, 256),
        workers=1,
        synthetic_train_images=320,
        synthetic_test_images=64,
        synthetic_size=256,
        synthetic_words=(40, 90),  # ~8 words per 256x256 image: enough positives per batch
    ),
    train=TrainConfig(
        epochs=14,
        batch_size=8,
        base_batch_size=8,
        optimizer="adam",
        lr=3e-3,
        weight_decay=0.0,
        eval_interval=1,
        save_interval=4,
        log_interval=5,
    ),
)

# The small DBNet++ (``dbnetpp_resnet18_dcnv2_tiny``: DCNv2 in stages 3-4 and the ASF neck, like
# the full model, at half the ResNet-18 width) on the same data: the main job.
# - Batch 4 at half the LR (the same LR per image) and 12 epochs: twice the optimiser steps per
#   minute get the probability map past its plateau (constant prediction, loss 2.9) sooner.
# - Crops of at least half the image side (MMOCR: 0.1). The crop is resized to 256, so MMOCR's crops
#   enlarge text up to 10x, and the held-out text is small: with 0.1, half of the missed words had a
#   short side under 15 pixels (recall 0.50-0.71 there, 0.95 above).
# - Tested at 1.25x (320 pixels for the 256-pixel images), the middle of the 1-2x enlargement those
#   crops train at: the same weights gave H-mean 0.927 at 320 against 0.903 at 256.
# - An EMA of the weights is evaluated: mixed against the raw weights of the same run (-0.012 to
#   +0.008 by epoch), +0.008 at the end, where the raw weights dipped.
# Measured curves (seeds 0-2, two OpenCV releases): benchmarks/main_job.py, in the README.
TINY_DBNETPP = dataclasses.replace(
    TINY_DBNET,
    data=dataclasses.replace(TINY_DBNET.data, crop_min_side_ratio=0.5, test_scale=(640, 320)),
    model=ModelConfig(name="dbnetpp_resnet18_dcnv2_tiny", channels_last=True),  # ~13 % faster steps on the CPU
    train=dataclasses.replace(
        TINY_DBNET.train, epochs=12, batch_size=4, base_batch_size=4, lr=1.5e-3, ema_decay=0.995
    ),
)

# The CPU main job of the README: the small DBNet++.
TINY = TINY_DBNETPP

# ----------------------------------------------------------------------------- MMOCR's recipes
# Read from MMOCR v1.0.1 configs/textdet/{dbnet,dbnetpp}/*.py and their _base_ files. Shared by all:
# SGD momentum 0.9, weight decay 1e-4, poly LR power 0.9 down to eta_min 1e-7, batch 16 per process
# quoted for a total of 16 (auto_scale_lr base_batch_size 16), 640x640 training crops, quad boxes.
# MMOCR scales the LR only under ``tools/train.py --auto-scale-lr``, and the published numbers were
# trained without it, so the recipes keep ``scale_lr=False``: N processes run N x 16 images per step
# at the recipe's LR, as ``tools/dist_train.sh`` does.
TORCHVISION_RESNET18 = "torchvision://resnet18"
TORCHVISION_RESNET50 = "torchvision://resnet50"
OCLIP_RESNET50 = "https://download.openmmlab.com/mmocr/backbone/resnet50-oclip-7ba0c533.pth"
DBNET_R50DCN_SYNTHTEXT = (
    "https://download.openmmlab.com/mmocr/textdet/dbnet/tmp_1.0_pretrain/"
    "dbnet_r50dcnv2_fpnc_sbn_2e_synthtext_20210325-ed322016.pth"
)
DBNETPP_R50DCN_SYNTHTEXT = (
    "https://download.openmmlab.com/mmocr/textdet/dbnetpp/tmp_1.0_pretrain/"
    "dbnetpp_r50dcnv2_fpnc_100k_iter_synthtext-20220502-352fec8a.pth"
)
R18_TEST_SCALE = (1333, 736)  # _base_dbnet_resnet18_fpnc.py
R50_TEST_SCALE = (4068, 1024)  # the ResNet-50 bases
DBNET_EPSILON, DBNETPP_EPSILON = 0.01, 0.002  # DBPostprocessor default / _base_dbnetpp_*.py


def _recipe(
    name: str,
    backbone_init: str,
    *,
    load_from: Optional[str] = None,
    lr: float = 0.007,
    warmup_epochs: int = 0,
    max_iters: Optional[int] = None,
    kind: str = "icdar2015",
    fix_polygons: Optional[int] = None,
) -> Config:
    """One MMOCR config: what differs between rows is an argument, the rest follows the name."""
    dbnetpp = name.startswith("dbnetpp_")
    model = ModelConfig(
        name=name,
        backbone_init=backbone_init,
        load_from=load_from,
        text_repr_type="quad",
        epsilon_ratio=DBNETPP_EPSILON if dbnetpp else DBNET_EPSILON,
    )
    test_scale = R18_TEST_SCALE if "resnet18" in name else R50_TEST_SCALE
    data = DataConfig(kind=kind, fix_polygons=fix_polygons, test_scale=test_scale)
    train = TrainConfig(lr=lr, scale_lr=False, warmup=warmup_epochs, warmup_factor=0.001)
    if max_iters is not None:  # schedule_sgd_100k.py + pretrain_runtime.py
        train = dataclasses.replace(
            train, max_iters=max_iters, eval_interval=0, save_interval_iters=10_000, keep_last=1, log_interval=1000
        )
    return Config(model=model, data=data, train=train).validate()


_SYNTHTEXT = dict(max_iters=100_000, kind="synthtext", fix_polygons=4)
_TOTALTEXT = dict(kind="totaltext", fix_polygons=4)

# ``dbnet_resnet50-dcnv2_fpnc_100k_synthtext`` is left out: in MMOCR 1.0.1 it reads
# ``_base_.synthtext_textdet_test``, which ``_base_/datasets/synthtext.py`` no longer defines, so
# the config does not load; no weights were published from it (the DBNet R50-DCN fine-tuning loads
# a SynthText model from MMOCR 0.x instead).
RECIPES: Dict[str, Config] = {
    r.model.name: r
    for r in (
        _recipe("dbnet_resnet18_fpnc_1200e_icdar2015", TORCHVISION_RESNET18),
        _recipe("dbnet_resnet18_fpnc_1200e_totaltext", TORCHVISION_RESNET18, **_TOTALTEXT),
        _recipe("dbnet_resnet18_fpnc_100k_synthtext", TORCHVISION_RESNET18, **_SYNTHTEXT),
        _recipe("dbnet_resnet50_1200e_icdar2015", TORCHVISION_RESNET50, lr=0.002, warmup_epochs=100),
        _recipe("dbnet_resnet50-dcnv2_fpnc_1200e_icdar2015", TORCHVISION_RESNET50, load_from=DBNET_R50DCN_SYNTHTEXT),
        _recipe("dbnet_resnet50-oclip_1200e_icdar2015", OCLIP_RESNET50, lr=0.002, warmup_epochs=100),
        _recipe("dbnetpp_resnet50_fpnc_1200e_icdar2015", TORCHVISION_RESNET50, lr=0.003, warmup_epochs=200),
        _recipe(
            "dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015", TORCHVISION_RESNET50, load_from=DBNETPP_R50DCN_SYNTHTEXT
        ),
        _recipe("dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015", OCLIP_RESNET50, lr=0.002, warmup_epochs=200),
        _recipe("dbnetpp_resnet50-dcnv2_fpnc_100k_synthtext", TORCHVISION_RESNET50, **_SYNTHTEXT),
    )
}

# Short names kept from earlier releases.
ALIASES: Dict[str, str] = {"mmocr": "dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015"}

PRESETS: Dict[str, Config] = {
    **RECIPES,
    **{alias: RECIPES[name] for alias, name in ALIASES.items()},
    "tiny": TINY,
    "tiny_dbnet": TINY_DBNET,
    "tiny_dbnetpp": TINY_DBNETPP,
}


def get_config(preset: Optional[str] = None, **overrides: Mapping[str, Any]) -> Config:
    """The named recipe or preset (None: ``mmocr``, the DBNet++ R50-DCNv2 recipe) with per-section overrides.

    ``get_config("dbnetpp_resnet50_fpnc_1200e_icdar2015", data={"root": "data/icdar2015"})``,
    ``get_config("tiny", train={"epochs": 1})``.
    Only keys whose value is not None are applied, so unset CLI flags keep the preset.
    """
    name = preset or "mmocr"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[name]
    sections = {}
    for section, values in overrides.items():
        if section not in ("model", "data", "train"):
            raise ValueError(f"unknown config section {section!r}")
        current = getattr(cfg, section)
        known = {f.name for f in dataclasses.fields(current)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {section} config keys: {unknown}")
        changes = {k: v for k, v in values.items() if v is not None}
        for key in ("test_scale", "synthetic_words"):
            if key in changes:
                changes[key] = tuple(changes[key])
        sections[section] = dataclasses.replace(current, **changes)
    return dataclasses.replace(cfg, **sections).validate()


# ----------------------------------------------------------------------------- test settings by model name
# The recipe whose test resize and post-processing a bare model name stands for: every MMOCR config
# name is its own recipe; the builder aliases take the ICDAR 2015 recipe of their architecture, the
# tiny networks the CPU preset that trains them.
_RECIPE_OF_MODEL: Dict[str, Config] = {
    **RECIPES,
    "dbnetpp_resnet50_dcnv2": RECIPES["dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015"],
    "dbnetpp_resnet50": RECIPES["dbnetpp_resnet50_fpnc_1200e_icdar2015"],
    "dbnet_resnet18": RECIPES["dbnet_resnet18_fpnc_1200e_icdar2015"],
    "dbnet_resnet18_tiny": TINY_DBNET,
    "dbnetpp_resnet18_dcnv2_tiny": TINY_DBNETPP,
}


@dataclass(frozen=True)
class InferenceRecipe:
    """What a model name implies at test time (MMOCR's test pipeline and ``DBPostprocessor``)."""

    test_scale: Tuple[int, int]  # (long, short) side limits of the keep-ratio test resize, pixels
    text_repr_type: str  # "quad" or "poly"
    epsilon_ratio: float  # approxPolyDP tolerance / contour length


def inference_recipe(model_name: str) -> Optional[InferenceRecipe]:
    """Test scale and post-processing of the recipe ``model_name`` stands for, or None.

    ``inference_recipe("dbnet_resnet18_fpnc_1200e_icdar2015")`` is (1333, 736), "quad", 0.01, as
    MMOCR's inferencer runs that config; every ``dbnetpp.MODEL_NAMES`` entry has one.
    """
    cfg = _RECIPE_OF_MODEL.get(model_name)
    if cfg is None:
        return None
    return InferenceRecipe(tuple(cfg.data.test_scale), cfg.model.text_repr_type, cfg.model.epsilon_ratio)

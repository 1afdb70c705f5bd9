"""Training configuration: three frozen dataclasses and named presets.

The defaults are MMOCR's DBNet++ recipe
(``dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015.py``): SGD lr 0.007, momentum 0.9,
weight decay 1e-4, poly LR (power 0.9, down to 1e-7) stepped per epoch, 1200 epochs,
batch 16, evaluation and a checkpoint every 20 epochs. ``PRESETS["tiny"]`` is the
CPU job of the README: a half-width ResNet-18 DBNet trained on 256x256 synthetic text (also
named ``"tiny_dbnet"``); ``PRESETS["tiny_dbnetpp"]`` trains the small DBNet++ (DCNv2 + ASF) the
same way.

CLI flags map one to one onto fields (``examples/train.py``); the resolved config is
printed, written to ``work_dir/config.json`` and stored in every checkpoint.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

OPTIMIZERS = ("sgd", "adam", "adamw")
AMP_DTYPES = ("bf16", "fp16")


@dataclass(frozen=True)
class ModelConfig:
    """Which detector to build and how to place it on the device."""

    name: str = "dbnetpp_resnet50_dcnv2"
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm under DDP
    channels_last: bool = False  # NHWC memory format (CUDA only)


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and at which sizes they are fed.

    ``root`` is an ICDAR 2015 folder; without it the model trains on
    ``SyntheticText`` and evaluates on a held-out synthetic split (another seed).
    """

    root: Optional[str] = None
    train_size: int = 640  # side of the square training crop, pixels
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
    clip_grad: Optional[float] = None  # max global gradient L2 norm
    amp: Optional[str] = None  # None, "bf16" or "fp16"
    eval_interval: int = 20  # epochs
    save_interval: int = 20  # epochs; last.pth and best.pth are written regardless
    log_interval: int = 5  # iterations
    seed: int = 0  # offset by the rank in each process
    keep_memory: bool = True  # CPU: malloc keeps freed memory (dbnetpp.allocator; ~1.5x faster steps)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

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
        t, d = self.train, self.data
        if t.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {t.optimizer!r}")
        if t.amp is not None and t.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {AMP_DTYPES} or None, got {t.amp!r}")
        for name in ("epochs", "batch_size", "base_batch_size", "eval_interval", "save_interval", "log_interval"):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if t.lr <= 0 or t.lr_min < 0:
            raise ValueError(f"need lr > 0 and lr_min >= 0, got lr={t.lr}, lr_min={t.lr_min}")
        if t.clip_grad is not None and t.clip_grad <= 0:
            raise ValueError(f"clip_grad must be > 0, got {t.clip_grad}")
        if d.train_size % 32 != 0:
            raise ValueError(f"data.train_size must be a multiple of 32, got {d.train_size}")
        if len(d.test_scale) != 2 or min(d.test_scale) < 32:
            raise ValueError(f"data.test_scale must be (long, short) >= 32 pixels, got {d.test_scale}")
        if d.synthetic_train_images < 1 or d.synthetic_test_images < 1 or d.synthetic_size < 32:
            raise ValueError(
                f"synthetic sets need >= 1 image of >= 32 pixels, got {d.synthetic_train_images}/"
                f"{d.synthetic_test_images} images of {d.synthetic_size}"
            )
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

# The small DBNet++ (``dbnetpp_resnet18_dcnv2_tiny``: DCNv2 in stages 2-4 and the ASF neck, like
# the full model, at half the ResNet-18 width) with the same data and schedule. Not yet the main
# job: on the 2-core machine it learns far slower than the DBNet above (H-mean ~0.2 after 6-11
# epochs where the DBNet has 0.8-0.89; Adam 1e-3 / 2e-3 / 3e-3 and SGD 0.03 tried). Measured
# apart, the DCN alone learns (about 40 steps behind the DBNet) while the ASF neck alone keeps
# the binary map's dice loss at ~0.92 for 120+ steps; a wider neck (4x32) did not help.
TINY_DBNETPP = dataclasses.replace(TINY_DBNET, model=ModelConfig(name="dbnetpp_resnet18_dcnv2_tiny"))

# The CPU main job of the README.
TINY = TINY_DBNET

PRESETS: Dict[str, Config] = {
    "mmocr": Config(),
    "tiny": TINY,
    "tiny_dbnet": TINY_DBNET,
    "tiny_dbnetpp": TINY_DBNETPP,
}


def get_config(preset: Optional[str] = None, **overrides: Mapping[str, Any]) -> Config:
    """The named preset (None: the MMOCR recipe) with per-section overrides.

    ``get_config("tiny", train={"epochs": 1}, data={"root": "/data/icdar2015"})``.
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

"""Data: ICDAR 2015, Total-Text, SynthText, synthetic scene text, the MMOCR pipelines and DB targets."""

from .base import AnnotatedImages, read_image
from .dataset import TestDataset, TrainDataset, collate_test, collate_train
from .icdar2015 import ICDAR2015
from .sources import FixedPolygons, open_dataset
from .synthetic import SyntheticText
from .synthtext import SynthText
from .targets import db_targets
from .textdet_json import TextDetJSON
from .transforms import (
    TrainParams,
    TrainSample,
    adjust_brightness,
    adjust_saturation,
    clip_polygons,
    color_jitter,
    crop,
    crop_polygons,
    fix_invalid_polygons,
    hflip,
    keep_ratio_size,
    pad_to_square,
    rescale,
    rescaled_size,
    resize_for_test,
    resize_keep_ratio,
    resize_polygons,
    rotate,
    rotation_matrix,
    sample_crop_box,
    sample_train_params,
    train_transform,
)

__all__ = [
    "open_dataset",
    "AnnotatedImages",
    "ICDAR2015",
    "TextDetJSON",
    "SynthText",
    "FixedPolygons",
    "read_image",
    "SyntheticText",
    "TrainDataset",
    "TestDataset",
    "collate_train",
    "collate_test",
    "db_targets",
    "TrainParams",
    "TrainSample",
    "adjust_brightness",
    "adjust_saturation",
    "clip_polygons",
    "color_jitter",
    "crop",
    "crop_polygons",
    "fix_invalid_polygons",
    "hflip",
    "keep_ratio_size",
    "pad_to_square",
    "rescale",
    "rescaled_size",
    "resize_for_test",
    "resize_keep_ratio",
    "resize_polygons",
    "rotate",
    "rotation_matrix",
    "sample_crop_box",
    "sample_train_params",
    "train_transform",
]

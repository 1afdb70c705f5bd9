"""Recipes by MMOCR config name: every field against MMOCR v1.0.1's config values, round trips."""

import dataclasses

import pytest

from dbnetpp.config import PRESETS, RECIPES, TINY, Config, get_config

DL = "https://download.openmmlab.com/mmocr/"
# Facts copied by hand from MMOCR v1.0.1 (configs/textdet/{dbnet,dbnetpp}/*.py, _base_ files,
# schedules, pretrain_runtime.py): (backbone init_cfg checkpoint, load_from, SGD lr, LinearLR end
# (0: none), max_iters (None: 1200 epochs), test Resize scale, DBPostprocessor epsilon_ratio,
# dataset, FixInvalidPolygon min_poly_points (None: not in the pipeline)).
MMOCR = {
    "dbnet_resnet18_fpnc_1200e_icdar2015": (
        "torchvision://resnet18", None, 0.007, 0, None, (1333, 736), 0.01, "icdar2015", None),
    "dbnet_resnet18_fpnc_1200e_totaltext": (
        "torchvision://resnet18", None, 0.007, 0, None, (1333, 736), 0.01, "totaltext", 4),
    "dbnet_resnet18_fpnc_100k_synthtext": (
        "torchvision://resnet18", None, 0.007, 0, 100000, (1333, 736), 0.01, "synthtext", 4),
    "dbnet_resnet50_1200e_icdar2015": (
        "torchvision://resnet50", None, 0.002, 100, None, (4068, 1024), 0.01, "icdar2015", None),
    "dbnet_resnet50-dcnv2_fpnc_1200e_icdar2015": (
        "torchvision://resnet50",
        DL + "textdet/dbnet/tmp_1.0_pretrain/dbnet_r50dcnv2_fpnc_sbn_2e_synthtext_20210325-ed322016.pth",
        0.007, 0, None, (4068, 1024), 0.01, "icdar2015", None),
    "dbnet_resnet50-oclip_1200e_icdar2015": (
        DL + "backbone/resnet50-oclip-7ba0c533.pth", None, 0.002, 100, None, (4068, 1024), 0.01, "icdar2015", None),
    "dbnetpp_resnet50_fpnc_1200e_icdar2015": (
        "torchvision://resnet50", None, 0.003, 200, None, (4068, 1024), 0.002, "icdar2015", None),
    "dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015": (
        "torchvision://resnet50",
        DL + "textdet/dbnetpp/tmp_1.0_pretrain/dbnetpp_r50dcnv2_fpnc_100k_iter_synthtext-20220502-352fec8a.pth",
        0.007, 0, None, (4068, 1024), 0.002, "icdar2015", None),
    "dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015": (
        DL + "backbone/resnet50-oclip-7ba0c533.pth", None, 0.002, 200, None, (4068, 1024), 0.002, "icdar2015", None),
    "dbnetpp_resnet50-dcnv2_fpnc_100k_synthtext": (
        "torchvision://resnet50", None, 0.007, 0, 100000, (4068, 1024), 0.002, "synthtext", 4),
}


def test_recipe_names():
    assert sorted(RECIPES) == sorted(MMOCR)
    assert set(RECIPES) <= set(PRESETS) and {"mmocr", "tiny"} <= set(PRESETS)
    assert "dbnet_resnet50-dcnv2_fpnc_100k_synthtext" not in PRESETS  # does not parse in MMOCR 1.0.1


@pytest.mark.parametrize("name", sorted(MMOCR))
def test_recipe_matches_mmocr(name):
    init, load_from, lr, warmup, max_iters, test_scale, eps, kind, fix = MMOCR[name]
    cfg = get_config(name)
    m, d, t = cfg.model, cfg.data, cfg.train
    assert m.name == name
    assert (m.backbone_init, m.load_from) == (init, load_from)
    assert (m.text_repr_type, m.epsilon_ratio) == ("quad", eps)
    assert (d.kind, d.fix_polygons, d.test_scale, d.train_size) == (kind, fix, test_scale, 640)
    # schedule_sgd_1200e.py / schedule_sgd_100k.py with the config's lr and LinearLR(start_factor=0.001)
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay) == ("sgd", lr, 0.9, 1e-4)
    assert (t.lr_power, t.lr_min, t.warmup) == (0.9, 1e-7, warmup)
    assert t.warmup == 0 or t.warmup_factor == 0.001
    assert (t.batch_size, t.base_batch_size, t.scale_lr) == (16, 16, False)
    assert (t.clip_grad, t.amp) == (None, None)
    if max_iters is None:  # default_runtime.py: val_interval 20, CheckpointHook(interval=20)
        assert (t.max_iters, t.epochs, t.eval_interval, t.save_interval) == (None, 1200, 20, 20)
        assert (t.save_interval_iters, t.keep_last) == (None, None)
    else:  # pretrain_runtime.py: CheckpointHook(interval=10000, by_epoch=False, max_keep_ckpts=1), no evaluator
        assert (t.max_iters, t.eval_interval, t.save_interval_iters, t.keep_last) == (max_iters, 0, 10000, 1)


def test_aliases_and_tiny():
    assert get_config() == get_config("mmocr") == RECIPES["dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015"]
    assert get_config("tiny") == TINY


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip(name):
    cfg = PRESETS[name]
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_overrides():
    cfg = get_config("dbnetpp_resnet50_fpnc_1200e_icdar2015", data={"root": "x", "kind": None}, train={"lr": 0.1})
    assert (cfg.data.root, cfg.data.kind, cfg.train.lr, cfg.train.warmup) == ("x", "icdar2015", 0.1, 200)
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("dbnet_resnet50-dcnv2_fpnc_100k_synthtext")
    with pytest.raises(ValueError, match="data.kind"):
        get_config("mmocr", data={"kind": "ctw1500"})
    with pytest.raises(ValueError, match="fix_polygons"):
        get_config("mmocr", data={"fix_polygons": 2})


def test_old_checkpoint_config_loads():
    """A config dict written before the recipe fields existed loads, new fields at their defaults."""
    new_keys = {
        "model": ("backbone_init", "load_from", "text_repr_type", "epsilon_ratio"),
        "data": ("kind", "fix_polygons"),
        "train": ("max_iters", "warmup", "warmup_factor", "save_interval_iters", "keep_last"),
    }
    old = Config().to_dict()
    for section, keys in new_keys.items():
        for key in keys:
            del old[section][key]
    cfg = Config.from_dict(old)
    assert cfg == Config()
    assert (cfg.model.backbone_init, cfg.model.load_from) == (None, None)
    assert (cfg.train.max_iters, cfg.train.warmup) == (None, 0)
    assert (cfg.data.kind, cfg.data.fix_polygons) == ("icdar2015", None)


def test_fields_documented_defaults_unchanged():
    # Config() keeps its earlier defaults so that old checkpoints' configs mean what they meant.
    t = Config().train
    assert (t.lr, t.scale_lr, t.eval_interval, t.save_interval) == (0.007, True, 20, 20)
    assert Config().model.name == "dbnetpp_resnet50_dcnv2"
    assert dataclasses.replace(Config()).validate() == Config()


def test_every_preset_names_a_buildable_model():
    from dbnetpp.models.dbnet import MODEL_NAMES

    for name, cfg in PRESETS.items():
        assert cfg.model.name in MODEL_NAMES, name

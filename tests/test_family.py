"""MMOCR's DBNet / DBNet++ family by name: architectures, state-dict keys, settings, strict loading.

``data/mmocr_dbnet_family_keys.json`` (a copy of shared/'s file) holds the state-dict keys and
shapes of the seven architectures, dumped from MMOCR v1.0.1 models built from each config.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import random_state_dict
from torch.nn.modules.batchnorm import _BatchNorm

from dbnetpp import load_mmocr_checkpoint
from dbnetpp.models import MODEL_NAMES, DBNet, ModulatedDeformConv2d, build_model
from dbnetpp.models.clip_resnet import CLIPResNet
from dbnetpp.models.resnet import ResNet

KEYS_FILE = Path(__file__).parent / "data" / "mmocr_dbnet_family_keys.json"
FAMILY = json.loads(KEYS_FILE.read_text())
CONFIGS = sorted(FAMILY["configs"])

# Settings read from MMOCR v1.0.1's configs (configs/textdet/{dbnet,dbnetpp}/*.py and _base_ files):
# (backbone class, depth, DCN stages, ASF, norm_eval). The oCLIP configs replace the backbone by
# a bare ``dict(type='CLIPResNet', init_cfg=...)``, so MMDetection's ResNet default norm_eval=True holds.
SETTINGS = {
    "dbnet_resnet18_fpnc_100k_synthtext": (ResNet, 18, 0, False, False),
    "dbnet_resnet18_fpnc_1200e_icdar2015": (ResNet, 18, 0, False, False),
    "dbnet_resnet18_fpnc_1200e_totaltext": (ResNet, 18, 0, False, False),
    "dbnet_resnet50-dcnv2_fpnc_1200e_icdar2015": (ResNet, 50, 13, False, False),
    "dbnet_resnet50-oclip_1200e_icdar2015": (CLIPResNet, 50, 0, False, True),
    "dbnet_resnet50_1200e_icdar2015": (ResNet, 50, 0, False, True),
    "dbnetpp_resnet50-dcnv2_fpnc_100k_synthtext": (ResNet, 50, 13, True, False),
    "dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015": (ResNet, 50, 13, True, False),
    "dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015": (CLIPResNet, 50, 0, True, True),
    "dbnetpp_resnet50_fpnc_1200e_icdar2015": (ResNet, 50, 0, True, True),
}
# today's short names and the architecture they build
SHORT_NAMES = {"dbnetpp_resnet50_dcnv2": "a4", "dbnetpp_resnet50": "a6", "dbnet_resnet18": "a0"}


def expected_keys(arch):
    return {k: tuple(shape) for k, shape in FAMILY["architectures"][arch]["keys"]}


def own_keys(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_json_is_consistent():
    assert len(CONFIGS) == 10 and len(FAMILY["architectures"]) == 7
    for name, arch in FAMILY["configs"].items():
        assert name in FAMILY["architectures"][arch]["configs"]
    for arch, entry in FAMILY["architectures"].items():
        assert entry["num_entries"] == len(entry["keys"]) == len(expected_keys(arch)), arch


def test_every_config_name_is_a_model_name():
    assert set(CONFIGS) <= set(MODEL_NAMES)
    tiny = {"dbnet_resnet18_tiny", "dbnetpp_resnet18_dcnv2_tiny"}
    assert set(SHORT_NAMES) | tiny <= set(MODEL_NAMES)
    assert len(set(MODEL_NAMES)) == len(MODEL_NAMES) == len(CONFIGS) + len(SHORT_NAMES) + len(tiny) == 15
    assert set(SETTINGS) == set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_keys_and_shapes_equal_mmocr(name):
    torch.manual_seed(0)
    model = build_model(name)
    assert isinstance(model, DBNet) and model.name == name
    ours, theirs = own_keys(model), expected_keys(FAMILY["configs"][name])
    assert sorted(set(ours) - set(theirs)) == [] and sorted(set(theirs) - set(ours)) == []
    assert {k: s for k, s in ours.items() if theirs[k] != s} == {}

    backbone_cls, depth, n_dcn, asf, norm_eval = SETTINGS[name]
    assert type(model.backbone) is backbone_cls and model.backbone.depth == depth
    assert sum(isinstance(m, ModulatedDeformConv2d) for m in model.modules()) == n_dcn
    assert model.neck.asf == asf
    assert model.backbone.norm_eval == norm_eval and model.backbone.frozen_stages == -1
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, _BatchNorm)]
    assert bns and all(bn.training != norm_eval for bn in bns)
    # neck and head BatchNorms always train
    assert all(m.training for m in model.det_head.modules() if isinstance(m, _BatchNorm))


@pytest.mark.parametrize("name,arch", sorted(SHORT_NAMES.items()))
def test_short_names_build_the_same_architecture(name, arch):
    assert own_keys(build_model(name)) == expected_keys(arch)
    assert build_model(name).backbone.norm_eval is False  # as before: overridable, recipe-independent


@pytest.mark.parametrize("arch", sorted(FAMILY["architectures"]))
def test_mmocr_checkpoint_loads_strictly_into_each_architecture(arch, tmp_path):
    """An MMOCR-format checkpoint (``{"meta", "state_dict"}``) with the json's keys loads strictly,
    value for value, into the model built from every config of that architecture."""
    keys = expected_keys(arch)
    sd = random_state_dict(keys, seed=int(arch[1:]))
    path = tmp_path / f"{arch}.pth"
    torch.save({"meta": {"epoch": 1200}, "state_dict": sd}, path)
    name = FAMILY["architectures"][arch]["configs"][0]
    model = build_model(name)
    report = load_mmocr_checkpoint(model, path)
    assert sorted(report["loaded"]) == sorted(keys)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in sd.items())
    # one key too many or one missing: a clear error naming it
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): backbone\.extra"):
        load_mmocr_checkpoint(model, dict(sd, **{"backbone.extra": torch.zeros(1)}))
    missing = dict(sd)
    del missing["det_head.binarize.6.bias"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): det_head\.binarize\.6\.bias"):
        load_mmocr_checkpoint(model, missing)


def test_clip_and_plain_r50_checkpoints_do_not_cross_load():
    plain = random_state_dict(expected_keys("a3"))
    with pytest.raises(ValueError, match=r"missing keys .*backbone\.stem\.0\.weight"):
        load_mmocr_checkpoint(build_model("dbnet_resnet50-oclip_1200e_icdar2015"), plain)


def test_overrides_and_unknown_names():
    model = build_model("dbnetpp_resnet50_fpnc_1200e_icdar2015", norm_eval=False, frozen_stages=1)
    assert model.backbone.norm_eval is False and model.backbone.frozen_stages == 1
    clip = build_model("dbnet_resnet50-oclip_1200e_icdar2015", frozen_stages=0)
    assert not any(p.requires_grad for p in clip.backbone.stem.parameters())
    assert all(p.requires_grad for p in clip.backbone.layer1.parameters())
    with pytest.raises(ValueError, match="CLIPResNet has no deformable"):
        build_model("dbnet_resnet50-oclip_1200e_icdar2015", dcn_stages=(False, True, True, True))
    with pytest.raises(ValueError, match="unknown model name 'dbnet_resnet50-dcnv2_fpnc_100k_synthtext'"):
        build_model("dbnet_resnet50-dcnv2_fpnc_100k_synthtext")
    with pytest.raises(ValueError, match="unknown override"):
        build_model("dbnet_resnet18_fpnc_1200e_icdar2015", dcn=True)


def test_same_architecture():
    from dbnetpp.models import same_architecture

    assert same_architecture("dbnetpp_resnet50_dcnv2", "dbnetpp_resnet50-dcnv2_fpnc_100k_synthtext")
    assert same_architecture("dbnetpp_resnet50", "dbnetpp_resnet50_fpnc_1200e_icdar2015")  # norm_eval only
    assert same_architecture("dbnet_resnet18", "dbnet_resnet18_fpnc_1200e_totaltext")
    assert not same_architecture("dbnet_resnet50_1200e_icdar2015", "dbnet_resnet50-oclip_1200e_icdar2015")
    assert not same_architecture("dbnet_resnet18", "dbnet_resnet18_tiny")
    assert not same_architecture("dbnetpp_resnet50", "no_such_model")
    # the claim behind it: equal keys and shapes wherever it says so
    for a in MODEL_NAMES:
        for b in MODEL_NAMES:
            if same_architecture(a, b):
                assert FAMILY["configs"].get(a, SHORT_NAMES.get(a)) == FAMILY["configs"].get(b, SHORT_NAMES.get(b))


def test_detector_accepts_an_alias_of_the_checkpoints_model(tmp_path):
    from dbnetpp.detector import load_model

    src = build_model("dbnet_resnet18")
    path = tmp_path / "r18.pth"
    torch.save({"model": src.state_dict(), "model_name": "dbnet_resnet18"}, path)
    with pytest.warns(UserWarning, match="dbnet_resnet18"):
        net = load_model(path, model="dbnet_resnet18_fpnc_1200e_icdar2015")
    assert net.name == "dbnet_resnet18_fpnc_1200e_icdar2015" and not net.training
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), net.state_dict().values()))
    with pytest.raises(ValueError, match="holds a 'dbnet_resnet18' model"):
        load_model(path, model="dbnet_resnet50_1200e_icdar2015")
    # MMOCR-format checkpoints carry no name: the name given picks the architecture
    clip = build_model("dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015")
    mmocr = tmp_path / "oclip.pth"
    torch.save({"meta": {}, "state_dict": clip.state_dict()}, mmocr)
    net = load_model(mmocr, model="dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015")
    assert isinstance(net.backbone, CLIPResNet)

"""Pretrained initialisation (``dbnetpp.pretrained.initialize``): ImageNet into the backbone,
whole-model ``load_from`` after it, a user's file instead of the recipe's, the opt-out, partial
and foreign files, and the offline message. Offline: TORCH_HOME is a temporary folder, files
are served from ``file://`` URLs and every other URL fails."""

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
import torchvision

from dbnetpp import hub
from dbnetpp.config import get_config
from dbnetpp.models.dbnet import build_model
from dbnetpp.pretrained import initialize


@pytest.fixture(autouse=True)
def offline_cache(offline_hub_cache):
    return offline_hub_cache


def imagenet_like(depth: int, seed: int = 0):
    """A random state dict with torchvision's ResNet key names and shapes (fc included)."""
    with torch.device("meta"):
        reference = getattr(torchvision.models, f"resnet{depth}")()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in reference.state_dict().items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        else:
            out[key] = torch.randn(value.shape, generator=g)
    return out


def place_in_cache(cache: Path, filename: str, obj) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(obj, cache / filename)
    return cache / filename


def publish(server: Path, stem: str, obj) -> str:
    server.mkdir(parents=True, exist_ok=True)
    tmp = server / "tmp.pth"
    torch.save(obj, tmp)
    path = server / f"{stem}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(path)
    return path.as_uri()


def recipe(name="dbnet_resnet18", backbone_init=None, load_from=None):
    """A config whose model section names exactly these (None included) initialisation files."""
    cfg = get_config()
    model = dataclasses.replace(cfg.model, name=name, backbone_init=backbone_init, load_from=load_from)
    return dataclasses.replace(cfg, model=model)


def random_state(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
        for k, v in model.state_dict().items()
    }


def no_download(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("no download expected")

    monkeypatch.setattr(hub, "_fetch", fail)


# ----------------------------------------------------------------------------- backbone init


def test_imagenet_weights_into_the_backbone_from_the_cache(monkeypatch, offline_cache):
    file_sd = imagenet_like(18)
    place_in_cache(offline_cache, "resnet18-f37072fd.pth", file_sd)
    no_download(monkeypatch)
    model = build_model("dbnet_resnet18_fpnc_1200e_icdar2015")
    neck_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    lines = initialize(model, recipe("dbnet_resnet18_fpnc_1200e_icdar2015", "torchvision://resnet18"), progress=False)
    assert len(lines) == 1 and lines[0].startswith("backbone: torchvision://resnet18")
    assert "resnet18-f37072fd.pth" in lines[0]
    backbone = model.backbone.state_dict()
    for key, value in file_sd.items():
        if not key.startswith("fc."):
            assert torch.equal(backbone[key], value), key
    for key, value in model.state_dict().items():  # the rest stays as built
        if not key.startswith("backbone."):
            assert torch.equal(value, neck_before[key]), key


def test_imagenet_into_dcn_backbone_leaves_conv_offset_zero(monkeypatch, offline_cache):
    file_sd = imagenet_like(50)
    place_in_cache(offline_cache, "resnet50-0676ba61.pth", file_sd)
    no_download(monkeypatch)
    model = build_model("dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015")
    initialize(model, recipe("dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015", "torchvision://resnet50"), progress=False)
    sd = model.backbone.state_dict()
    offsets = [k for k in sd if ".conv_offset." in k]
    assert len(offsets) == 26  # 13 DCNv2 convs in layer2-4, weight and bias each
    assert all(torch.count_nonzero(sd[k]) == 0 for k in offsets)
    assert torch.equal(sd["layer3.2.conv2.weight"], file_sd["layer3.2.conv2.weight"])
    assert torch.equal(sd["layer4.2.bn3.running_var"], file_sd["layer4.2.bn3.running_var"])


def test_oclip_recipe_loads_the_oclip_backbone_from_the_cache(monkeypatch, offline_cache):
    name = "dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015"
    cfg = get_config(name)
    assert cfg.model.backbone_init == "https://download.openmmlab.com/mmocr/backbone/resnet50-oclip-7ba0c533.pth"
    model = build_model(name)
    file_sd = random_state(model.backbone, seed=6)  # MMOCR's CLIPResNet names
    place_in_cache(offline_cache, "resnet50-oclip-7ba0c533.pth", file_sd)
    no_download(monkeypatch)
    lines = initialize(model, cfg, progress=False)
    assert len(lines) == 1 and lines[0].startswith(f"backbone: {cfg.model.backbone_init} (")
    sd = model.backbone.state_dict()
    for key, value in file_sd.items():
        assert torch.equal(sd[key], value), key


def test_recipe_most_users_run_finds_resnet50_in_the_cache(monkeypatch, offline_cache):
    """dbnetpp_resnet50_fpnc_1200e_icdar2015: torchvision's resnet50-0676ba61.pth, no download."""
    name = "dbnetpp_resnet50_fpnc_1200e_icdar2015"
    cfg = get_config(name)
    assert (cfg.model.backbone_init, cfg.model.load_from) == ("torchvision://resnet50", None)
    file_sd = imagenet_like(50, seed=7)
    place_in_cache(offline_cache, "resnet50-0676ba61.pth", file_sd)
    no_download(monkeypatch)
    model = build_model(name)
    initialize(model, cfg, progress=False)
    sd = model.backbone.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in file_sd.items() if not k.startswith("fc."))


def test_finetuning_recipe_loads_the_synthtext_model_from_the_cache(monkeypatch, offline_cache):
    """dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015: MMOCR's SynthText file (pre-filled under its
    published name, MMOCR keys) is the whole model; ImageNet is not needed."""
    name = "dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015"
    cfg = get_config(name)
    filename = "dbnetpp_r50dcnv2_fpnc_100k_iter_synthtext-20220502-352fec8a.pth"
    assert cfg.model.load_from.endswith("/tmp_1.0_pretrain/" + filename)
    model = build_model(name)
    state = random_state(model, seed=8)
    place_in_cache(offline_cache, filename, {"meta": {"iter": 100000}, "state_dict": state})
    no_download(monkeypatch)
    lines = initialize(model, cfg, progress=False)
    assert lines[0].startswith("backbone: torchvision://resnet50 skipped")
    assert lines[1].endswith(f"{len(state)} tensors loaded")
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


# ----------------------------------------------------------------------------- load_from


@pytest.fixture
def synthtext(tmp_path, monkeypatch):
    """A published SynthText-pretrained model (MMOCR keys, mmengine wrapping) as a file:// entry."""
    model = build_model("dbnet_resnet18")
    state = random_state(model, seed=1)
    url = publish(tmp_path / "server", "st_pretrain", {"meta": {"iter": 100000}, "state_dict": state})
    monkeypatch.setitem(hub.PUBLISHED, "st_pretrain", hub.PublishedWeights("st_pretrain", url, arch="dbnet_resnet18"))
    return state


def test_load_from_after_backbone_init_as_mmocr(synthtext, monkeypatch, offline_cache):
    """The SynthText model holds every backbone weight: the ImageNet init (not cached, offline)
    is skipped, with the same result, and the whole model equals the file."""
    model = build_model("dbnet_resnet18")
    lines = initialize(model, recipe("dbnet_resnet18", "torchvision://resnet18", "st_pretrain"), progress=False)
    assert lines[0] == "backbone: torchvision://resnet18 skipped (every backbone weight comes from st_pretrain)"
    assert lines[1].startswith("model: st_pretrain (") and lines[1].endswith(f"{len(synthtext)} tensors loaded")
    for key, value in model.state_dict().items():
        assert torch.equal(value, synthtext[key]), key
    assert not (offline_cache / "resnet18-f37072fd.pth").exists()


def test_backbone_init_then_partial_load_from(tmp_path, monkeypatch, offline_cache):
    """A file without backbone weights: ImageNet first, then the file's keys on top (MMOCR order)."""
    file_sd = imagenet_like(18)
    place_in_cache(offline_cache, "resnet18-f37072fd.pth", file_sd)
    full = random_state(build_model("dbnet_resnet18"), 2)
    head_only = {k: v for k, v in full.items() if not k.startswith("backbone.")}
    path = tmp_path / "head_only.pth"
    torch.save({"state_dict": head_only}, path)
    model = build_model("dbnet_resnet18")
    with pytest.warns(UserWarning, match="do not match exactly"):
        lines = initialize(model, recipe("dbnet_resnet18", "torchvision://resnet18", str(path)), progress=False)
    assert lines[0].startswith("backbone: torchvision://resnet18 (")
    assert "kept (not in the file)" in lines[1]
    sd = model.state_dict()
    assert torch.equal(sd["backbone.layer2.1.conv2.weight"], file_sd["layer2.1.conv2.weight"])
    assert torch.equal(sd["det_head.binarize.0.weight"], head_only["det_head.binarize.0.weight"])


def test_user_load_from_replaces_the_recipes(synthtext, tmp_path, monkeypatch):
    model = build_model("dbnet_resnet18")
    mine = random_state(model, seed=3)
    path = tmp_path / "mine.pth"
    torch.save({"model": mine, "model_name": "dbnet_resnet18", "epoch": 3}, path)  # a dbnetpp checkpoint
    broken = hub.PublishedWeights("st_pretrain", (tmp_path / "missing-00000000.pth").as_uri())
    monkeypatch.setitem(hub.PUBLISHED, "st_pretrain", broken)  # the recipe's file must not be needed
    lines = initialize(model, recipe("dbnet_resnet18", None, "st_pretrain"), progress=False, load_from=str(path))
    assert lines == [f"model: {path}: {len(mine)} tensors loaded"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, mine[key]), key
    # --no-pretrained still honours the user's file
    other = build_model("dbnet_resnet18")
    cfg = recipe("dbnet_resnet18", "torchvision://resnet18", "st_pretrain")
    initialize(other, cfg, pretrained=False, load_from=str(path))
    assert torch.equal(other.state_dict()["neck.lateral_convs.0.conv.weight"], mine["neck.lateral_convs.0.conv.weight"])


def test_no_pretrained_touches_nothing(synthtext):
    model = build_model("dbnet_resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert initialize(model, recipe("dbnet_resnet18", "torchvision://resnet18", "st_pretrain"), pretrained=False) == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_mmocr_0x_head_name_and_ddp_prefix(tmp_path):
    model = build_model("dbnet_resnet18")
    state = random_state(model, seed=4)
    old = {("module." + k).replace("det_head.", "bbox_head."): v for k, v in state.items()}
    path = tmp_path / "old.pth"
    torch.save({"state_dict": old}, path)
    initialize(model, recipe("dbnet_resnet18", None, str(path)))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_foreign_architecture_refused(tmp_path):
    other = random_state(build_model("dbnet_resnet18_tiny"), seed=5)
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": other}, path)
    model = build_model("dbnet_resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="weights of another architecture .*mis-shaped"):
        initialize(model, recipe("dbnet_resnet18", None, str(path)))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_offline_initialisation_error_names_the_opt_out(offline_cache):
    model = build_model("dbnet_resnet18")
    with pytest.raises(OSError) as info:
        initialize(model, recipe("dbnet_resnet18", "torchvision://resnet18"), progress=False)
    message = str(info.value)
    for part in ("resnet18-f37072fd.pth", "https://download.pytorch.org/models/resnet18-f37072fd.pth",
                 str(offline_cache), "--no-pretrained"):  # fmt: skip
        assert part in message


def test_missing_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file, and not a published name"):
        initialize(build_model("dbnet_resnet18"), recipe("dbnet_resnet18", None, str(tmp_path / "nope.pth")))

import json
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import random_state_dict

from dbnetpp.models import ModulatedDeformConv2d, build_model
from dbnetpp.weights import load_mmocr_checkpoint, load_oclip_backbone, load_torchvision_backbone

MMOCR_PARAMS = 26_904_875  # MMOCR v1.0.1 DBNet++ R50-DCNv2: sum of parameter numels
MMOCR_PARAM_TENSORS = 218
MMOCR_STATE_ENTRIES = 389


# MMOCR's model.state_dict() keys and shapes, dumped from MMOCR itself (a copy of shared/'s file).
KEYS_FILE = Path(__file__).parent / "data" / "mmocr_dbnetpp_r50dcn_keys.json"


@pytest.fixture(scope="module")
def mmocr_keys():
    """[(key, shape)] of MMOCR's model.state_dict(), in order."""
    data = json.loads(KEYS_FILE.read_text())
    return [(k, tuple(shape)) for k, shape in data["keys"]]


@pytest.fixture(scope="module")
def model():
    return build_model("dbnetpp_resnet50_dcnv2")


def test_parameter_count(model):
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == MMOCR_PARAMS
    assert len(params) == MMOCR_PARAM_TENSORS
    assert len(model.state_dict()) == MMOCR_STATE_ENTRIES


def test_state_dict_keys_equal_mmocr(model, mmocr_keys):
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == mmocr_keys


def test_mmocr_checkpoint_loads_strictly(model, mmocr_keys, tmp_path):
    sd = random_state_dict(mmocr_keys)
    report = load_mmocr_checkpoint(model, sd)
    assert sorted(report["loaded"]) == sorted(sd)
    loaded = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k
    # the values are really in use: a DCN offset predictor and a neck conv
    assert torch.equal(model.backbone.layer3[2].conv2.conv_offset.bias, sd["backbone.layer3.2.conv2.conv_offset.bias"])
    assert torch.equal(model.neck.asf_attn.spatial_wise[0].conv.weight, sd["neck.asf_attn.spatial_wise.0.conv.weight"])

    # mmengine layout {"meta", "state_dict"} saved to a file
    sd2 = random_state_dict(mmocr_keys, seed=1)
    path = tmp_path / "dbnetpp.pth"
    torch.save({"meta": {"mmocr_version": "1.0.1", "epoch": 1200}, "state_dict": sd2}, path)
    load_mmocr_checkpoint(model, path)
    assert torch.equal(model.det_head.threshold[6].weight, sd2["det_head.threshold.6.weight"])
    load_mmocr_checkpoint(model, str(path))
    assert torch.equal(model.backbone.conv1.weight, sd2["backbone.conv1.weight"])


def test_mmocr_checkpoint_errors_name_the_keys(model, mmocr_keys):
    sd = random_state_dict(mmocr_keys)
    before = model.backbone.conv1.weight.detach().clone()

    missing = dict(sd)
    del missing["backbone.layer4.1.conv2.conv_offset.weight"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): backbone\.layer4\.1\.conv2\.conv_offset\.weight"):
        load_mmocr_checkpoint(model, missing)

    extra = dict(sd, **{"neck.asf_conv.conv.extra": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): neck\.asf_conv\.conv\.extra"):
        load_mmocr_checkpoint(model, extra)

    bad = dict(sd)
    bad["det_head.binarize.3.weight"] = torch.zeros(64, 64, 3, 3)
    shapes = r"det_head\.binarize\.3\.weight: checkpoint \(64, 64, 3, 3\) vs model \(64, 64, 2, 2\)"
    with pytest.raises(ValueError, match=shapes):
        load_mmocr_checkpoint(model, bad)

    # a failed load leaves the model untouched
    assert torch.equal(model.backbone.conv1.weight, before)


def test_bad_files(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_mmocr_checkpoint(model, tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_mmocr_checkpoint(model, junk)
    with pytest.raises(ValueError, match="not tensors"):
        load_mmocr_checkpoint(model, {"backbone.conv1.weight": [1, 2, 3]})


def test_torchvision_backbone_loading(tmp_path):
    torch.manual_seed(0)
    model = build_model("dbnetpp_resnet50_dcnv2")
    tv_sd = torchvision.models.resnet50().state_dict()  # random init, no download
    assert "fc.weight" in tv_sd
    path = tmp_path / "resnet50.pth"
    torch.save(tv_sd, path)
    report = load_torchvision_backbone(model, path)
    assert set(report["ignored"]) == {"fc.weight", "fc.bias"}
    assert len(report["kept"]) == 2 * 13 and all(".conv_offset." in k for k in report["kept"])
    ours = model.backbone.state_dict()
    for k, v in tv_sd.items():
        if not k.startswith("fc."):
            assert torch.equal(ours[k], v), k
    # DCN main weight comes from torchvision's conv2, the offset predictor stays zero
    dcn = model.backbone.layer2[0].conv2
    assert isinstance(dcn, ModulatedDeformConv2d)
    assert torch.equal(dcn.weight, tv_sd["layer2.0.conv2.weight"])
    assert torch.count_nonzero(dcn.conv_offset.weight) == 0

    # also accepts a ResNet directly, and old files without num_batches_tracked
    plain = build_model("dbnetpp_resnet50")
    old = {k: v for k, v in tv_sd.items() if not k.endswith("num_batches_tracked")}
    load_torchvision_backbone(plain.backbone, old)
    assert torch.equal(plain.backbone.layer4[2].bn3.running_var, tv_sd["layer4.2.bn3.running_var"])


def test_torchvision_backbone_errors(model):
    tv_sd = torchvision.models.resnet50().state_dict()
    missing = dict(tv_sd)
    del missing["layer3.1.bn2.running_var"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): layer3\.1\.bn2\.running_var"):
        load_torchvision_backbone(model, missing)
    extra = dict(tv_sd, **{"layer5.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): layer5\.0\.conv1\.weight"):
        load_torchvision_backbone(model, extra)
    r18 = build_model("dbnet_resnet18_tiny")
    with pytest.raises(ValueError, match=r"conv1\.weight: checkpoint \(64, 3, 7, 7\) vs model \(32, 3, 7, 7\)"):
        load_torchvision_backbone(r18, torchvision.models.resnet18().state_dict())


class HistoryBuffer:
    """Stands for mmengine objects pickled into MMOCR checkpoints' ``meta``/``message_hub``."""

    ran = []

    def __init__(self):
        self.values = [0.5, 0.25]

    def __setstate__(self, state):  # must never run while loading weights
        HistoryBuffer.ran.append(state)
        self.__dict__.update(state)


def test_mmengine_checkpoint_with_foreign_objects_loads_without_running_them(tmp_path):
    import numpy as np

    src = build_model("dbnet_resnet18_tiny")
    for p in src.parameters():
        torch.nn.init.normal_(p)
    ckpt = {
        "meta": {"seed": np.int64(7), "epoch": 1200, "hook": HistoryBuffer()},
        "state_dict": src.state_dict(),
        "message_hub": {"log_scalars": {"loss": HistoryBuffer()}},
    }
    path = tmp_path / "mmocr_like.pth"
    torch.save(ckpt, path)
    with pytest.raises(Exception):  # plain weights_only refuses the file
        torch.load(path, weights_only=True)

    dst = build_model("dbnet_resnet18_tiny")
    load_mmocr_checkpoint(dst, path)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    assert HistoryBuffer.ran == []


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_mmocr_checkpoint(build_model("dbnet_resnet18_tiny"), path)


@pytest.mark.parametrize(
    "name,tv_arch",
    [
        ("dbnet_resnet18_fpnc_1200e_icdar2015", "resnet18"),
        ("dbnet_resnet50_1200e_icdar2015", "resnet50"),
        ("dbnet_resnet50-dcnv2_fpnc_1200e_icdar2015", "resnet50"),
    ],
)
def test_torchvision_backbone_gives_torchvisions_features(name, tv_arch):
    """After loading, the backbone's four stage outputs are torchvision's own layer1..layer4 outputs
    (a DCN with zero offsets is its plain conv times the mask 0.5: checked on the DCN-free models)."""
    torch.manual_seed(0)
    tv = getattr(torchvision.models, tv_arch)().eval()  # random init, no download
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in tv.modules():  # non-trivial BN statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    model = build_model(name).eval()
    report = load_torchvision_backbone(model, tv.state_dict())
    assert set(report["ignored"]) == {"fc.weight", "fc.bias"}
    if "dcnv2" in name:
        assert report["kept"] and all(".conv_offset." in k for k in report["kept"])
        return
    assert report["kept"] == []
    x = torch.randn(1, 3, 64, 96, generator=gen)
    with torch.no_grad():
        ours = model.backbone(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for i, out in enumerate(ours, start=1):
            y = getattr(tv, f"layer{i}")(y)
            torch.testing.assert_close(out, y, atol=1e-5, rtol=1e-5)


def clip_names(sd):
    """MMOCR CLIPResNet names -> CLIP ModifiedResNet names (conv1..bn3 stem, downsample.0/1)."""
    stem = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"}
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "stem":
            parts = [stem[parts[1]]] + parts[2:]
        if "downsample" in parts:
            i = parts.index("downsample") + 1
            parts[i] = str(int(parts[i]) - 1)
        out[".".join(parts)] = v
    return out


@pytest.fixture(scope="module")
def oclip_sd():
    """A random backbone state dict with MMOCR CLIPResNet names (what resnet50-oclip-7ba0c533.pth holds)."""
    torch.manual_seed(0)
    keys = build_model("dbnet_resnet50-oclip_1200e_icdar2015").backbone.state_dict()
    return random_state_dict([(k, tuple(v.shape)) for k, v in keys.items()], seed=3)


def assert_backbone_equals(model, sd):
    state = model.backbone.state_dict()
    assert state.keys() == sd.keys()
    assert all(torch.equal(state[k], v) for k, v in sd.items())


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "backbone_prefix", "both", "file"])
def test_oclip_backbone_loads_mmocr_layout(oclip_sd, wrap, tmp_path):
    model = build_model("dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015")
    neck_before = {k: v.clone() for k, v in model.neck.state_dict().items()}
    prefixed = {"backbone." + k: v for k, v in oclip_sd.items()}
    given = {
        "plain": oclip_sd,
        "state_dict": {"state_dict": oclip_sd, "meta": {}},
        "backbone_prefix": prefixed,
        "both": {"state_dict": prefixed},
        "file": tmp_path / "resnet50-oclip.pth",
    }[wrap]
    if wrap == "file":
        torch.save(oclip_sd, given)
    report = load_oclip_backbone(model, given)
    assert report["layout"] == "mmocr" and report["ignored"] == []
    assert_backbone_equals(model, oclip_sd)
    assert all(torch.equal(model.neck.state_dict()[k], v) for k, v in neck_before.items())  # only the backbone


def test_oclip_backbone_other_layouts(oclip_sd):
    """CLIP's own names (module.visual. prefix, attnpool head) and the stem numbered 0..5 of oCLIP's
    tools/convert2mmocr.py are renamed to MMOCR's, then loaded strictly."""
    clip = {"module.visual." + k: v for k, v in clip_names(oclip_sd).items()}
    clip["module.visual.attnpool.c_proj.weight"] = torch.zeros(1024, 2048)
    model = build_model("dbnet_resnet50-oclip_1200e_icdar2015")
    report = load_oclip_backbone(model, {"state_dict": clip})
    assert report["layout"] == "clip" and report["ignored"] == ["module.visual.attnpool.c_proj.weight"]
    assert_backbone_equals(model, oclip_sd)

    to_contiguous = {"0": "0", "1": "1", "3": "2", "4": "3", "6": "4", "7": "5"}
    contiguous = {}
    for k, v in oclip_sd.items():
        if k.startswith("stem."):
            _, i, rest = k.split(".", 2)
            k = f"stem.{to_contiguous[i]}.{rest}"
        contiguous[k] = v
    model = build_model("dbnet_resnet50-oclip_1200e_icdar2015")
    assert load_oclip_backbone(model.backbone, contiguous)["layout"] == "contiguous_stem"
    assert_backbone_equals(model, oclip_sd)


def test_oclip_backbone_errors(oclip_sd):
    model = build_model("dbnet_resnet50-oclip_1200e_icdar2015")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    missing = {k: v for k, v in oclip_sd.items() if k != "layer3.2.bn1.running_var"}
    with pytest.raises(ValueError, match=r"missing keys \(1\): layer3\.2\.bn1\.running_var"):
        load_oclip_backbone(model, missing)
    bad = dict(oclip_sd, **{"layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3)})
    shapes = r"layer1\.0\.conv1\.weight: checkpoint \(64, 64, 3, 3\) vs model \(64, 64, 1, 1\)"
    with pytest.raises(ValueError, match=shapes):
        load_oclip_backbone(model, bad)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): fc\.weight"):
        load_oclip_backbone(model, dict(oclip_sd, **{"fc.weight": torch.zeros(2)}))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # untouched
    with pytest.raises(ValueError, match="need a CLIPResNet backbone, got ResNet"):
        load_oclip_backbone(build_model("dbnet_resnet18_tiny"), oclip_sd)
    # torchvision weights are refused by the CLIPResNet (stem names differ), clearly
    with pytest.raises(ValueError, match=r"missing keys .*stem\.0\.weight"):
        load_torchvision_backbone(model, torchvision.models.resnet50().state_dict())

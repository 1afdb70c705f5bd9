import json
from pathlib import Path

import pytest
import torch
import torchvision

from dbnetpp.models import ModulatedDeformConv2d, build_model
from dbnetpp.weights import load_mmocr_checkpoint, load_torchvision_backbone

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


def random_state_dict(keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in keys:
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.randint(0, 1000, shape, generator=g, dtype=torch.long)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[k] = torch.randn(shape, generator=g)
    return sd


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

import os
import random

import numpy as np
import pytest
import torch
import torchvision

from dbnetpp.checkpoint import (
    CheckpointError,
    detect_format,
    get_rng_state,
    load_model_weights,
    read_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from dbnetpp.config import get_config
from dbnetpp.engine import build_optimizer
from dbnetpp.models.dbnet import build_model


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("dbnet_resnet18_tiny")


def full_checkpoint(model, epoch=3):
    """A checkpoint in the training script's format, after one real optimiser step."""
    optimizer = build_optimizer(model, "sgd", 0.007, momentum=0.9, weight_decay=1e-4)
    model.train()
    out = model(torch.randn(1, 3, 64, 64))
    (out["prob_logits"].mean() + out["thr_map"].mean()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # GradScaler(init_scale=1024).state_dict(), written out: torch.amp.GradScaler needs torch >= 2.3
    scaler_state = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                    "_growth_tracker": 0}
    return {
        "model": model.state_dict(),
        "model_name": model.name,
        "config": get_config("tiny_dbnet").to_dict(),
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "global_step": 4 * (epoch + 1),
        "scaler": scaler_state,
        "rng": [get_rng_state()],
        "best_hmean": 0.25,
    }


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_checkpoint_round_trips_through_weights_only_load(tmp_path, tiny_model):
    ckpt = full_checkpoint(tiny_model)
    path = tmp_path / "last.pth"
    save_checkpoint(ckpt, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and python values only
    assert_same(ckpt, loaded)
    assert loaded["optimizer"]["state"], "momentum buffers must be stored"
    assert loaded["global_step"] == 16
    assert loaded["scaler"]["scale"] == 1024.0
    assert all(k.startswith(("backbone.", "neck.", "det_head.")) for k in loaded["model"])
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]


def test_one_write_several_names(tmp_path, tiny_model):
    ckpt = full_checkpoint(tiny_model, epoch=7)
    paths = [tmp_path / "last.pth", tmp_path / "best.pth", tmp_path / "sub" / "epoch_8.pth"]
    save_checkpoint(ckpt, paths)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["best.pth", "epoch_8.pth", "last.pth"]
    for p in paths:
        assert read_checkpoint(p)["epoch"] == 7
    # a later write to last.pth must not change best.pth (hard links share bytes until replaced)
    save_checkpoint({**ckpt, "epoch": 8}, paths[0])
    assert read_checkpoint(paths[0])["epoch"] == 8
    assert read_checkpoint(paths[1])["epoch"] == 7


def test_interrupted_save_keeps_previous_checkpoint_and_no_temp_file(tmp_path, tiny_model, monkeypatch):
    path = tmp_path / "last.pth"
    good = full_checkpoint(tiny_model, epoch=1)
    save_checkpoint(good, path)
    before = path.read_bytes()

    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        import io

        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({**good, "epoch": 2}, [path, tmp_path / "best.pth"])
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["last.pth"]  # no stray temp file, best.pth not created
    assert path.read_bytes() == before
    assert read_checkpoint(path)["epoch"] == 1


def test_interrupted_rename_cleans_up(tmp_path, tiny_model, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1}, path)

    def failing_replace(src, dst):
        raise OSError("rename failed (simulated)")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]
    assert read_checkpoint(path) == {"epoch": 1}


def test_read_checkpoint_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_checkpoint(missing)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError, match="garbage.pth"):
        read_checkpoint(garbage)

    truncated = tmp_path / "truncated.pth"
    save_checkpoint({"w": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        read_checkpoint(truncated)

    unsafe = tmp_path / "unsafe.pth"  # an arbitrary pickled object: refused by weights_only
    torch.save({"obj": np.random.RandomState(0)}, unsafe)
    with pytest.raises(CheckpointError, match="unsafe.pth"):
        read_checkpoint(unsafe)

    a_list = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], a_list)
    with pytest.raises(CheckpointError, match="list.pth.*list"):
        read_checkpoint(a_list)


def test_detect_format():
    w = torch.zeros(1)
    assert detect_format({"model": {"backbone.conv1.weight": w}, "model_name": "x"}) == "dbnetpp"
    assert detect_format({"meta": {}, "state_dict": {"backbone.conv1.weight": w}}) == "mmocr"
    assert detect_format({"module.neck.lateral_convs.0.conv.weight": w}) == "state_dict"
    resnet = {"conv1.weight": w, "bn1.weight": w, "layer1.0.conv1.weight": w, "fc.weight": w}
    assert detect_format(resnet) == "torchvision"
    with pytest.raises(CheckpointError, match="unrecognised"):
        detect_format({"encoder.weight": w})


def _perturbed_copy(model):
    other = build_model(model.name)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    return other


def test_load_model_weights_accepts_every_format(tmp_path, tiny_model):
    want = tiny_model.state_dict()
    path = tmp_path / "ours.pth"
    save_checkpoint(full_checkpoint(tiny_model), path)
    sources = {
        "dbnetpp": path,
        "mmocr": {"meta": {"epoch": 3}, "state_dict": want},
        "state_dict": {"module." + k: v for k, v in want.items()},  # saved from a DDP wrapper
    }
    for fmt, source in sources.items():
        model = _perturbed_copy(tiny_model)
        assert load_model_weights(model, source) == fmt
        got = model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), fmt


def test_load_model_weights_reads_mmengine_files_with_foreign_objects(tmp_path, tiny_model):
    path = tmp_path / "mmocr_zoo.pth"  # mmengine pickles numpy objects into "meta"
    meta = {"seed": np.random.RandomState(0), "epoch": np.int64(1200)}
    torch.save({"meta": meta, "state_dict": tiny_model.state_dict()}, path)
    with pytest.raises(CheckpointError, match="mmocr_zoo.pth"):
        read_checkpoint(path)  # our own format stays strict
    model = _perturbed_copy(tiny_model)
    assert load_model_weights(model, path) == "mmocr"
    want = tiny_model.state_dict()
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)


def test_load_model_weights_torchvision_backbone():
    torch.manual_seed(1)
    resnet = torchvision.models.resnet18(weights=None).state_dict()
    model = build_model("dbnet_resnet18")
    neck_before = {k: v.clone() for k, v in model.neck.state_dict().items()}
    assert load_model_weights(model, resnet) == "torchvision"
    backbone = model.backbone.state_dict()
    for k, v in resnet.items():
        if not k.startswith("fc."):
            assert torch.equal(backbone[k], v), k
    assert all(torch.equal(v, model.neck.state_dict()[k]) for k, v in neck_before.items())


def test_load_model_weights_mismatch_names_the_file(tmp_path, tiny_model):
    path = tmp_path / "r18.pth"
    big = build_model("dbnet_resnet18")
    save_checkpoint({"model": big.state_dict(), "model_name": big.name}, path)
    with pytest.warns(UserWarning, match="dbnet_resnet18"), pytest.raises(ValueError, match="(?s)r18.pth.*mis-shaped"):
        load_model_weights(build_model("dbnet_resnet18_tiny"), path)


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = get_rng_state()
    first = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    path = tmp_path / "rng.pth"
    save_checkpoint({"rng": [state]}, path)
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(read_checkpoint(path)["rng"][0])
    again = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    assert again == first

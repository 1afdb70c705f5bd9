"""Published weights (``dbnetpp.hub``): the table, download / cache / hash / offline paths,
``Detector.from_pretrained`` and ``dbnetpp detect --weights NAME``. Offline: files are served
from ``file://`` URLs, the cache lives under a temporary TORCH_HOME, and any other URL fails."""

import hashlib
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import dbnetpp
from dbnetpp import hub
from dbnetpp.cli import format_polygon, main
from dbnetpp.detector import Detector
from dbnetpp.models.dbnet import MODEL_NAMES, build_model


@pytest.fixture(autouse=True)
def offline_cache(offline_hub_cache):
    return offline_hub_cache


def mmocr_checkpoint(model):
    """A model state dict wrapped as mmengine saves it."""
    return {"meta": {"mmocr_version": "1.0.1", "epoch": 1200}, "state_dict": model.state_dict()}


def publish(server: Path, stem: str, obj, *, corrupt: bool = False) -> str:
    """torch.save ``obj`` as ``<stem>-<sha256[:8]>.pth`` in ``server``; file:// URL of it.
    ``corrupt``: the name carries a hash the bytes do not have."""
    server.mkdir(parents=True, exist_ok=True)
    tmp = server / "tmp.pth"
    torch.save(obj, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    if corrupt:
        digest = f"{(int(digest, 16) + 1) % 16**8:08x}"
    path = server / f"{stem}-{digest}.pth"
    tmp.rename(path)
    return path.as_uri()


def add_entry(monkeypatch, name: str, url: str, **fields) -> hub.PublishedWeights:
    entry = hub.PublishedWeights(name, url, **fields)
    monkeypatch.setitem(hub.PUBLISHED, name, entry)
    return entry


# ----------------------------------------------------------------------------- the table


def test_table_urls_names_and_hashes():
    for name in hub.DETECTORS:
        entry = hub.PUBLISHED[name]
        family = name.split("_")[0]
        assert entry.url == f"https://download.openmmlab.com/mmocr/textdet/{family}/{name}/{entry.filename}"
        assert entry.filename.startswith(name)
        assert re.fullmatch(r"[0-9a-f]{8}", entry.hash_prefix)
        assert entry.arch == name and entry.arch in MODEL_NAMES
        assert entry.epsilon_ratio == (0.002 if family == "dbnetpp" else 0.01)
    pretrain = [e for e in hub.PUBLISHED.values() if "tmp_1.0_pretrain" in e.url]
    assert {e.hash_prefix for e in pretrain} == {"352fec8a", "ed322016"}
    assert all(e.arch in MODEL_NAMES for e in pretrain)
    oclip = "https://download.openmmlab.com/mmocr/backbone/resnet50-oclip-7ba0c533.pth"
    assert hub.get_weights("resnet50-oclip").url == oclip


def test_published_hmean_is_the_harmonic_mean_of_precision_and_recall():
    published = [hub.PUBLISHED[n] for n in hub.DETECTORS if hub.PUBLISHED[n].hmean is not None]
    assert len(published) == 8
    for e in published:
        assert abs(2 * e.precision * e.recall / (e.precision + e.recall) - e.hmean) < 1e-4, e.name


def test_list_models_exported_and_complete():
    models = dbnetpp.list_models()
    assert list(models) == list(hub.DETECTORS) and len(models) == 10
    assert models["dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015"] == max(v for v in models.values() if v is not None)
    assert [n for n, h in models.items() if h is None] == [
        "dbnet_resnet18_fpnc_100k_synthtext",
        "dbnetpp_resnet50-dcnv2_fpnc_100k_synthtext",
    ]


def test_torchvision_names_use_torchvision_weights_api():
    import torchvision.models as tvm

    for depth, enum in ((18, tvm.ResNet18_Weights), (50, tvm.ResNet50_Weights)):
        entry = hub.get_weights(f"torchvision://resnet{depth}")
        assert entry.url == enum.IMAGENET1K_V1.url and entry.kind == "backbone"
    assert hub.get_weights("torchvision://resnet50").filename == "resnet50-0676ba61.pth"


def test_aliases_and_unknown_names():
    assert hub.resolve_name("DBNetpp") == "dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015"
    assert hub.resolve_name("dbnet_resnet50-oclip_fpnc_1200e_icdar2015") == "dbnet_resnet50-oclip_1200e_icdar2015"
    entry = hub.PUBLISHED["dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015"]
    assert hub.resolve_name(entry.url) == hub.resolve_name(entry.filename) == entry.name
    with pytest.raises(ValueError, match="unknown published weights 'dbnetpp_r101'.*dbnetpp models"):
        hub.get_weights("dbnetpp_r101")


def test_table_agrees_with_the_recipes():
    """Test scale and post-processing in the table equal get_config(name)'s (names it knows)."""
    from dbnetpp.config import get_config

    checked = 0
    for name in hub.DETECTORS:
        try:
            cfg = get_config(name)
        except ValueError:
            continue
        entry = hub.PUBLISHED[name]
        assert tuple(cfg.data.test_scale) == entry.test_scale, name
        assert cfg.model.epsilon_ratio == entry.epsilon_ratio, name
        assert cfg.model.text_repr_type == entry.text_repr_type, name
        checked += 1
    if not checked:
        pytest.skip("get_config does not know the MMOCR config names yet")


# ----------------------------------------------------------------------------- download and cache


def test_download_once_then_cached_without_network(tmp_path, monkeypatch, offline_cache):
    model = build_model("dbnet_resnet18_tiny")
    url = publish(tmp_path / "server", "tiny_zoo", mmocr_checkpoint(model))
    add_entry(monkeypatch, "tiny_zoo", url, arch="dbnet_resnet18_tiny")
    path = hub.download_weights("tiny_zoo", progress=False)
    assert path.parent == offline_cache and path.name == hub.get_weights("tiny_zoo").filename
    assert path.read_bytes() == Path(url[len("file://") :]).read_bytes()
    assert sorted(p.name for p in offline_cache.iterdir()) == [path.name]  # no temporary files left

    def no_fetch(*args, **kwargs):
        raise AssertionError("the cached file must be used without downloading")

    monkeypatch.setattr(hub, "_fetch", no_fetch)
    assert hub.download_weights("tiny_zoo", progress=False) == path
    assert hub.cached_path("tiny_zoo") == path
    # the file reads back with weights_only into the same weights
    from dbnetpp.weights import load_mmocr_checkpoint

    fresh = build_model("dbnet_resnet18_tiny")
    load_mmocr_checkpoint(fresh, path)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_wrong_hash_refused_and_nothing_left(tmp_path, monkeypatch, offline_cache):
    url = publish(tmp_path / "server", "bad_zoo", {"state_dict": {"x": torch.ones(3)}}, corrupt=True)
    add_entry(monkeypatch, "bad_zoo", url)
    filename = hub.get_weights("bad_zoo").filename
    pattern = rf"refused {re.escape(filename)}.*SHA-256.*starting with {hub.hash_prefix(filename)}"
    with pytest.raises(ValueError, match=pattern):
        hub.download_weights("bad_zoo", progress=False)
    assert list(offline_cache.iterdir()) == []


def test_offline_error_names_file_url_folder_and_opt_out(tmp_path, monkeypatch, offline_cache):
    name = "dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015"
    entry = hub.PUBLISHED[name]
    with pytest.raises(hub.WeightsUnavailableError) as info:
        hub.download_weights(name, progress=False, hint="pass --no-pretrained to start from random weights")
    message = str(info.value)
    for part in (entry.filename, entry.url, str(offline_cache), "--no-pretrained", "network disabled"):
        assert part in message
    assert isinstance(info.value, OSError)
    assert list(offline_cache.iterdir()) == []
    # a file:// URL that does not exist is reported the same way
    add_entry(monkeypatch, "gone", (tmp_path / "gone-0123abcd.pth").as_uri())
    with pytest.raises(hub.WeightsUnavailableError, match="cannot download gone-0123abcd.pth"):
        hub.download_weights("gone", progress=False)


def test_torchvision_file_in_cache_found_without_network(monkeypatch, offline_cache):
    offline_cache.mkdir(parents=True)
    placed = offline_cache / "resnet50-0676ba61.pth"  # where torchvision / mmengine put it
    torch.save({"conv1.weight": torch.zeros(1)}, placed)

    def fail(*args, **kwargs):
        raise AssertionError("no download expected")

    monkeypatch.setattr(hub, "_fetch", fail)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    assert hub.download_weights("torchvision://resnet50", progress=False) == placed


def test_progress_bar_on_stderr(tmp_path, monkeypatch, capsys):
    url = publish(tmp_path / "server", "bar_zoo", {"state_dict": {"x": torch.ones(1000)}})
    add_entry(monkeypatch, "bar_zoo", url)
    hub.download_weights("bar_zoo", progress=True)
    err = capsys.readouterr().err
    assert hub.get_weights("bar_zoo").filename in err and "100%" in err


# ----------------------------------------------------------------------------- names at the door


@pytest.fixture
def tiny_published(tmp_path, monkeypatch):
    """A published 'tiny_text' detector whose map is ~1 everywhere (one detection per image),
    with its own test scale and post-processing."""
    model = build_model("dbnet_resnet18_tiny")
    with torch.no_grad():
        model.det_head.binarize[6].bias.fill_(6.0)
    url = publish(tmp_path / "server", "tiny_text", mmocr_checkpoint(model))
    return add_entry(
        monkeypatch,
        "tiny_text",
        url,
        arch="dbnet_resnet18_tiny",
        test_scale=(256, 160),
        text_repr_type="poly",
        epsilon_ratio=0.01,
    )


@pytest.fixture
def photo(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, size=(150, 200, 3), dtype=np.uint8)
    path = tmp_path / "photo.jpg"
    cv2.imwrite(str(path), image)
    return path


def test_detector_from_pretrained_uses_recipe_settings(tiny_published, photo):
    detector = Detector.from_pretrained("tiny_text", progress=False)
    assert detector.test_scale == (256, 160) and detector.model_name == "dbnet_resnet18_tiny"
    assert detector.postprocessor.text_repr_type == "poly"
    assert detector.postprocessor.epsilon_ratio == 0.01
    reference = Detector(
        hub.cached_path("tiny_text"),
        "dbnet_resnet18_tiny",
        test_scale=(256, 160),
        text_repr_type="poly",
        epsilon_ratio=0.01,
    )
    got, want = detector.detect(photo), reference.detect(photo)
    assert len(got) == len(want) >= 1
    for (p, s), (q, t) in zip(got, want):
        np.testing.assert_allclose(p, q)
        assert s == pytest.approx(t)
    override = Detector.from_pretrained("tiny_text", progress=False, test_scale=(128, 64), epsilon_ratio=0.002)
    assert override.test_scale == (128, 64) and override.postprocessor.epsilon_ratio == 0.002


def test_from_pretrained_refuses_backbones_and_unknown_names():
    with pytest.raises(ValueError, match="backbone weights, not a trained detector"):
        Detector.from_pretrained("torchvision://resnet50")
    with pytest.raises(ValueError, match="unknown published weights"):
        Detector.from_pretrained("no_such_model")


def test_cli_detect_with_a_published_name(tiny_published, photo, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["detect", str(photo), "--weights", "tiny_text", "--out", str(out), "--no-vis"]) == 0
    lines = (out / "res_photo.txt").read_text().splitlines()
    expected = Detector.from_pretrained("tiny_text", progress=False).detect(photo)
    assert lines == [format_polygon(p) for p, _ in expected] and len(lines) >= 1


def test_cli_unknown_weights_name(photo, tmp_path, capsys):
    status = main(["detect", str(photo), "--weights", "dbnetpp_r101_zoo", "--out", str(tmp_path / "o")])
    assert status == 1
    err = capsys.readouterr().err
    assert "no such checkpoint file, and not a published model name" in err and "dbnetpp models" in err


def test_cli_models_table(capsys, offline_cache):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| dbnet")]
    assert [row.split(" | ")[0][2:] for row in rows] == list(hub.DETECTORS)
    assert "| dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015 | 0.8882 | 0.9174 | 0.8609 | 4068x1024 |" in out
    assert str(offline_cache) in out


def test_from_pretrained_best_dbnetpp_from_a_prefilled_cache(monkeypatch, offline_cache):
    """The published oCLIP DBNet++ file (built here with MMOCR's keys) under its real name in the
    cache: no download, the recipe's architecture, test scale and epsilon."""
    name = "dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015"
    model = build_model(name)
    offline_cache.mkdir(parents=True)
    torch.save(mmocr_checkpoint(model), offline_cache / hub.PUBLISHED[name].filename)
    monkeypatch.setattr(hub, "_fetch", lambda *a, **k: pytest.fail("no download expected"))
    detector = Detector.from_pretrained("DBNetpp", progress=False, prepare=False)
    assert detector.model_name == name and detector.test_scale == (4068, 1024)
    assert detector.postprocessor.epsilon_ratio == 0.002 and detector.postprocessor.text_repr_type == "quad"
    for key, value in model.state_dict().items():
        assert torch.equal(detector.model.state_dict()[key], value), key


def test_cli_eval_with_a_published_name_uses_its_test_scale(tiny_published, tmp_path, capsys):
    from dbnetpp.data.synthetic import SyntheticText

    root = SyntheticText(1, 128, seed=0).write_icdar(tmp_path / "icdar", "test")
    assert main(["eval", "--data", str(root), "--weights", "tiny_text"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["test_scale"] == [256, 160] and record["model"] == "dbnet_resnet18_tiny"
    assert record["weights"] == "tiny_text" and record["num_images"] == 1


def test_cli_offline_published_name(photo, tmp_path, capsys, offline_cache):
    name = "dbnetpp_resnet50-oclip_fpnc_1200e_icdar2015"
    assert main(["detect", str(photo), "--weights", name, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    entry = hub.PUBLISHED[name]
    for part in (entry.filename, entry.url, str(offline_cache), "--weights the path of a local checkpoint"):
        assert part in err

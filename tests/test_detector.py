"""Detector: test resize, padding, post-processing and rescaling back to original pixels.

Two kinds of model:
- ``BrightIsText``, a pointwise stand-in network (probability = "pixel brighter than mid-grey"),
  so the expected boxes of white rectangles follow from geometry alone;
- a ``dbnet_resnet18_tiny`` overfitted inside the test on synthetic text (``trained`` fixture,
  also written as a dbnetpp checkpoint that ``tests/test_cli.py`` reuses).
"""

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import random_state_dict
from shapely.geometry import Polygon
from torch import nn

from dbnetpp.checkpoint import save_checkpoint
from dbnetpp.config import get_config, inference_recipe
from dbnetpp.data import SyntheticText, db_targets
from dbnetpp.detector import Detector, load_model, read_image
from dbnetpp.loss import DBLoss
from dbnetpp.models.dbnet import MODEL_NAMES, build_model
from dbnetpp.preprocess import normalize_image

MEAN_RGB = np.array([123.675, 116.28, 103.53])
STD_RGB = np.array([58.395, 57.12, 57.375])
# normalised value (mean over RGB) of a mid-grey pixel (127.5): the stand-in's text threshold
MID_GREY = float(np.mean((127.5 - MEAN_RGB) / STD_RGB))

# the overfitted model: one 256 x 256 synthetic image with 7 words (one '###')
TRAIN_SIZE = 256
TRAIN_SEED = 0
TRAIN_WORDS = (40, 60)  # words attempted per 640 x 640 (scaled by area)
TRAIN_LR = 3e-3
TRAIN_MAX_STEPS = 400
TRAIN_STOP_LOSS = 0.9  # ~190 Adam steps; the words are found from ~125 on


def synthetic_set(num_images=1):
    """The training image is sample 0; further samples were never seen in training."""
    return SyntheticText(num_images, TRAIN_SIZE, seed=TRAIN_SEED, words_per_image=TRAIN_WORDS)


def train_tiny_checkpoint(directory: Path) -> Path:
    """Overfit ``dbnet_resnet18_tiny`` on synthetic sample 0 (Adam, full DB loss, no augmentation)
    and save it as a dbnetpp checkpoint with the tiny preset's config (test scale (512, 256), so
    a 256 x 256 image is not resized). Reuses the file when this session already made it."""
    path = directory / "tiny_synthetic.pth"
    if path.is_file():
        return path
    sample = synthetic_set()[0]
    images = normalize_image(sample["image"])[None]
    maps = db_targets(sample["polygons"], sample["ignore"], TRAIN_SIZE, TRAIN_SIZE)
    targets = {k: torch.from_numpy(v)[None] for k, v in maps.items()}
    torch.manual_seed(0)
    model = build_model("dbnet_resnet18_tiny").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=TRAIN_LR)
    criterion = DBLoss()
    start = time.time()
    # one thread: small convolutions gain little from a second one, and on a busy 2-core machine
    # two OpenMP threads per process slow this loop down several times
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(TRAIN_MAX_STEPS):
            loss = criterion(model(images), targets)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if loss.item() < TRAIN_STOP_LOSS:
                break
    finally:
        torch.set_num_threads(threads)
    config = get_config("tiny_dbnet").to_dict()
    config["run"] = {"steps": step + 1, "final_loss": loss.item(), "seconds": time.time() - start}
    save_checkpoint({"model": model.state_dict(), "model_name": model.name, "config": config, "epoch": 0}, path)
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.getbasetemp() / "trained_tiny")


def iou(a, b):
    a, b = Polygon(np.asarray(a).reshape(-1, 2)), Polygon(np.asarray(b).reshape(-1, 2))
    union = a.union(b).area
    return a.intersection(b).area / union if union else 0.0


def best_ious(detections, gt_polygons):
    """For each ground-truth polygon the best IoU of any detection (0 without detections)."""
    return np.array([max((iou(p, g) for p, _ in detections), default=0.0) for g in gt_polygons])


class BrightIsText(nn.Module):
    """(N, 3, H, W) normalised -> (N, H, W): ~1 where the pixel is brighter than mid-grey, ~0 elsewhere
    (including the zero padding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(200.0 * (x.mean(dim=1) - MID_GREY))


def draw_rects(height, width, rects):
    """Black BGR image with white rectangles [x0, x1) x [y0, y1) (pixels)."""
    image = np.zeros((height, width, 3), np.uint8)
    for x0, y0, x1, y1 in rects:
        image[y0:y1, x0:x1] = 255
    return image


def expected_box(rect, scale, height, width):
    """Axis-aligned box (x_min, y_min, x_max, y_max) in original pixels that MMOCR's recipe gives for a
    white rectangle, derived by hand:

    - bilinear resize by (sx, sy): resized pixel j is brighter than mid-grey iff its centre
      (j + 0.5) / s falls inside [x0, x1), so the mask spans j0 = floor(x0*s - 0.5) + 1 ..
      j1 = ceil(x1*s - 0.5) - 1 (clipped to the image);
    - the contour runs through those pixel indices: a w x h rectangle, w = j1 - j0, h = i1 - i0;
    - unclip by d = area * 1.5 / perimeter; the min-area rectangle of the rounded offset is the box
      grown by d on every side;
    - divide by the scale factor.
    """
    sx, sy = scale
    new_w, new_h = int(width * sx + 0.5), int(height * sy + 0.5)
    x0, y0, x1, y1 = rect
    j0, j1 = max(np.floor(x0 * sx - 0.5) + 1, 0), min(np.ceil(x1 * sx - 0.5) - 1, new_w - 1)
    i0, i1 = max(np.floor(y0 * sy - 0.5) + 1, 0), min(np.ceil(y1 * sy - 0.5) - 1, new_h - 1)
    w, h = j1 - j0, i1 - i0
    d = w * h * 1.5 / (2 * (w + h))
    return np.array([(j0 - d) / sx, (i0 - d) / sy, (j1 + d) / sx, (i1 + d) / sy])


def keep_ratio_scale(height, width, scale=(4068, 1024)):
    """MMOCR's keep-ratio Resize: (sx, sy) = (new_w / w, new_h / h)."""
    s = min(scale[0] / max(height, width), scale[1] / min(height, width))
    return int(width * s + 0.5) / width, int(height * s + 0.5) / height


def bbox(polygon):
    return np.concatenate([polygon.min(axis=0), polygon.max(axis=0)])


def match_boxes(detections, rects):
    """For every rect, the detection whose bbox centre is nearest to the rect's centre."""
    centres = np.array([bbox(p).reshape(2, 2).mean(axis=0) for p, _ in detections])
    out = []
    for x0, y0, x1, y1 in rects:
        k = int(np.argmin(np.linalg.norm(centres - [(x0 + x1) / 2, (y0 + y1) / 2], axis=1)))
        out.append(detections[k])
    return out


# three rectangles: inside, touching the right border, touching the bottom border
RECT_IMAGE = (150, 250, [(20, 30, 100, 50), (180, 60, 250, 80), (40, 110, 140, 150)])


@pytest.mark.parametrize("factor", [1.0, 1.5])
def test_bright_rectangles_come_back_in_original_pixels(factor):
    height, width, rects = RECT_IMAGE
    height, width = int(height * factor), int(width * factor)
    rects = [tuple(int(v * factor) for v in r) for r in rects]
    image = draw_rects(height, width, rects)
    detector = Detector(BrightIsText(), test_scale=(4068, 1024))
    detections = detector.detect(image)
    assert len(detections) == len(rects)
    scale = keep_ratio_scale(height, width)
    for (polygon, score), rect in zip(match_boxes(detections, rects), rects):
        assert polygon.dtype == np.float32 and polygon.shape == (4, 2)
        assert score > 0.99
        expected = expected_box(rect, scale, height, width)
        # 2.5 resized pixels: bilinear corners are chamfered, so approxPolyDP keeps a corner
        # point or two and the min-area rectangle tilts slightly; pyclipper rounds to integers
        np.testing.assert_allclose(bbox(polygon), expected, atol=2.5 / min(scale))


def test_resized_input_gives_resized_coordinates():
    height, width, rects = RECT_IMAGE
    image = draw_rects(height, width, rects)
    big = cv2.resize(image, (width * 3 // 2, height * 3 // 2), interpolation=cv2.INTER_NEAREST)
    detector = Detector(BrightIsText(), test_scale=(4068, 1024))
    small_boxes = np.array([bbox(p) for p, _ in match_boxes(detector.detect(image), rects)])
    big_rects = [tuple(v * 3 // 2 for v in r) for r in rects]
    big_boxes = np.array([bbox(p) for p, _ in match_boxes(detector.detect(big), big_rects)])
    # both are resized to a 1024 short side; each box is within 2.5 resized pixels of its geometry
    resized_px = 1.5 / keep_ratio_scale(height, width)[0]
    np.testing.assert_allclose(big_boxes, small_boxes * 1.5, atol=5 * resized_px)


def test_batch_equals_single_images():
    """Images of different sizes in one batch: each map is cropped to its own extent, so the
    result equals the single-image one exactly (the stand-in network is pointwise)."""
    a = draw_rects(150, 250, RECT_IMAGE[2])
    b = draw_rects(100, 90, [(10, 10, 60, 30), (5, 50, 85, 99)])
    c = np.zeros((64, 64, 3), np.uint8)
    detector = Detector(BrightIsText(), test_scale=(400, 200))
    batched = detector.detect_batch([a, b, c])
    singles = [detector.detect(img) for img in (a, b, c)]
    assert [len(r) for r in batched] == [3, 2, 0]
    for got, want in zip(batched, singles):
        assert len(got) == len(want)
        for (p, s), (q, t) in zip(got, want):
            np.testing.assert_array_equal(p, q)
            assert s == t


def test_batch_composition_does_not_change_a_real_network_result():
    """A real (random-weight) network: a small image detected alone, batched with a larger one
    (more zero padding would reach its receptive field) and with an equal-size one, gives the
    same map and detections; results come back in input order."""
    torch.manual_seed(0)
    net = build_model("dbnet_resnet18_tiny").eval()
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    small2 = rng.integers(0, 256, (66, 94, 3), dtype=np.uint8)  # same padded size as small
    large = rng.integers(0, 256, (200, 600, 3), dtype=np.uint8)  # padded to 128 x 320
    detector = Detector(net, test_scale=(400, 100))
    detector.postprocessor.min_text_score = 0.0  # random weights: keep every region
    (alone,), _ = detector.predict_maps([small])
    (large_alone,), _ = detector.predict_maps([large])
    (alone2,), _ = detector.predict_maps([small2])
    assert alone2.shape == alone.shape == (128, 160)  # batched together below
    assert large_alone.shape == (128, 320)
    maps, _ = detector.predict_maps([large, small, small2, large])
    assert [m.shape for m in maps] == [large_alone.shape, alone.shape, alone.shape, large_alone.shape]
    np.testing.assert_allclose(maps[2], alone2, rtol=0, atol=2e-5)
    # 2e-5: float32 kernels may sum in another order for a batch of 2; padding changes are >> 1e-3
    np.testing.assert_allclose(maps[1], alone, rtol=0, atol=2e-5)
    np.testing.assert_allclose(maps[0], large_alone, rtol=0, atol=2e-5)
    np.testing.assert_allclose(maps[3], large_alone, rtol=0, atol=2e-5)
    single = detector.detect(small)
    batched = detector.detect_batch([large, small])[1]
    assert len(batched) == len(single)
    for (p, s), (q, t) in zip(batched, single):
        np.testing.assert_allclose(p, q, atol=1e-3)
        assert s == pytest.approx(t, abs=1e-6)


def test_input_forms(tmp_path):
    image = draw_rects(120, 160, [(20, 20, 140, 50), (30, 70, 90, 100)])
    gray = image[:, :, 0].copy()
    path = tmp_path / "rects.png"
    cv2.imwrite(str(path), image)
    detector = Detector(BrightIsText(), test_scale=(320, 240))
    reference = detector.detect(image)
    assert len(reference) == 2
    for other in (detector.detect(path), detector.detect(str(path)), detector(gray)):
        assert len(other) == len(reference)
        for (p, _), (q, _) in zip(other, reference):
            np.testing.assert_array_equal(p, q)
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(image.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        detector.detect(np.zeros((10, 10, 2), np.uint8))


def test_poly_mode_returns_the_unclipped_polygon():
    image = draw_rects(100, 200, [(20, 30, 180, 60)])
    quad = Detector(BrightIsText(), test_scale=(400, 200)).detect(image)
    poly = Detector(BrightIsText(), test_scale=(400, 200), text_repr_type="poly").detect(image)
    assert len(quad) == len(poly) == 1
    assert quad[0][0].shape == (4, 2) and poly[0][0].shape[0] > 4  # rounded corners
    # the min-area rectangle of the polygon is the quad
    assert Polygon(poly[0][0]).area == pytest.approx(Polygon(quad[0][0]).area, rel=0.03)


def test_preprocessing_matches_an_independent_pipeline():
    """Resize / normalise / pad written out by hand (REFERENCE sections 5 and 8) against the
    maps the detector feeds to the post-processor."""
    torch.manual_seed(0)
    net = build_model("dbnet_resnet18_tiny").eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(45, 70, 3), dtype=np.uint8)
    detector = Detector(net, test_scale=(200, 100))
    (prob,), ((sx, sy),) = detector.predict_maps([image])

    s = min(200 / 70, 100 / 45)
    new_w, new_h = int(70 * s + 0.5), int(45 * s + 0.5)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    rgb = (resized[:, :, ::-1].astype(np.float64) - MEAN_RGB) / STD_RGB
    padded = np.zeros((-(-new_h // 32) * 32, -(-new_w // 32) * 32, 3))
    padded[:new_h, :new_w] = rgb
    with torch.no_grad():
        expected = net(torch.from_numpy(padded).permute(2, 0, 1)[None].float())[0].numpy()
    assert (sx, sy) == (new_w / 70, new_h / 45)
    assert prob.shape == expected.shape == (128, 160)  # 156 x 100 padded
    np.testing.assert_allclose(prob, expected, atol=1e-4)


# ----------------------------------------------------------------------------- a trained model


@pytest.mark.slow
def test_trained_model_finds_the_words(trained, tmp_path):
    sample = synthetic_set()[0]
    cared = [p for p, ignored in zip(sample["polygons"], sample["ignore"]) if not ignored]
    assert len(cared) >= 5
    detector = Detector(trained)  # model name and test scale come from the checkpoint
    assert detector.model_name == "dbnet_resnet18_tiny" and detector.test_scale == (512, 256)

    detections = detector.detect(sample["image"])
    ious = best_ious(detections, cared)
    assert (ious >= 0.5).mean() >= 0.8, ious
    # at most one detection away from every word (ignored ones included)
    assert sum(max(iou(p, g) for g in sample["polygons"]) < 0.3 for p, _ in detections) <= 1

    # the same image 1.5x larger: the coordinates come back in the larger image's pixels
    big = cv2.resize(sample["image"], None, fx=1.5, fy=1.5, interpolation=cv2.INTER_LINEAR)
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), big)
    big_detections = detector.detect(path)
    big_ious = best_ious(big_detections, [g * 1.5 for g in cared])
    assert (big_ious >= 0.5).mean() >= 0.8, big_ious
    assert (best_ious(big_detections, [g for g in cared]) < 0.5).all()  # not the small image's pixels


# ----------------------------------------------------------------------------- weights and errors


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_checkpoint_formats_and_errors(tmp_path):
    torch.manual_seed(0)
    net = build_model("dbnet_resnet18_tiny").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = net(x)
    ours = _save(
        {"model": net.state_dict(), "model_name": net.name, "config": {"data": {"test_scale": [640, 320]}}, "epoch": 3},
        tmp_path / "ours.pth",
    )
    mmocr = _save({"meta": {"epoch": 3}, "state_dict": net.state_dict()}, tmp_path / "mmocr.pth")

    for loaded in (load_model(ours), load_model(mmocr, "dbnet_resnet18_tiny")):
        assert loaded.name == "dbnet_resnet18_tiny" and not loaded.training
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), want)

    assert Detector(ours).test_scale == (640, 320)  # from the checkpoint's config
    assert Detector(ours, test_scale=(100, 50)).test_scale == (100, 50)
    assert Detector(mmocr, "dbnet_resnet18_tiny").test_scale == (512, 256)  # the name's preset

    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        Detector(tmp_path / "nothere.pth")
    # MMOCR file of another model: the default DBNet++ R50-DCN does not fit
    with pytest.raises(ValueError, match=r"mmocr\.pth.*do not fit model 'dbnetpp_resnet50_dcnv2'"):
        load_model(mmocr)
    with pytest.raises(ValueError, match=r"ours\.pth holds a 'dbnet_resnet18_tiny' model.*'dbnet_resnet18'"):
        load_model(ours, "dbnet_resnet18")
    # a dbnetpp checkpoint whose weights are not those of its model name
    wrong = _save({"model": net.state_dict(), "model_name": "dbnet_resnet18", "epoch": 0}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"wrong\.pth.*do not fit model 'dbnet_resnet18'"):
        load_model(wrong)
    resnet = {k[len("backbone.") :]: v for k, v in net.state_dict().items() if k.startswith("backbone.")}
    backbone_only = _save({**resnet, "fc.weight": torch.zeros(10, 256)}, tmp_path / "tv.pth")
    with pytest.raises(ValueError, match=r"tv\.pth .*not a trained detector"):
        load_model(backbone_only)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_model(garbage)
    # an mmengine model-zoo file: foreign objects in meta, still loadable (as with --load-from)
    zoo = _save({"meta": {"seed": np.int64(3)}, "state_dict": net.state_dict()}, tmp_path / "zoo.pth")
    with pytest.raises(Exception):
        torch.load(zoo, weights_only=True)
    loaded = load_model(zoo, model="dbnet_resnet18_tiny")
    for (k, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_read_image_errors(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        read_image(bad)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        read_image(tmp_path / "missing.jpg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png"):
        read_image(empty)


class _RunsCode:
    """Unpickling this would call print (any function): the safe loaders must not."""

    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_zoo_checkpoint_without_torch_2_5_unsafe_globals_api(tmp_path, monkeypatch, capsys):
    """torch 2.1 ... 2.4 have no get_unsafe_globals_in_checkpoint / safe_globals: the allow-list
    unpickler loads the tensors, turns foreign objects into stand-ins and runs nothing."""
    import torch.serialization

    from dbnetpp.weights import load_state_dict_file

    net = build_model("dbnet_resnet18_tiny")
    path = tmp_path / "zoo.pth"
    torch.save({"meta": {"seed": np.int64(3), "hook": _RunsCode()}, "state_dict": net.state_dict()}, path)
    monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint", raising=False)
    loaded = load_state_dict_file(path)
    assert "unpickled code ran" not in capsys.readouterr().out
    assert type(loaded["meta"]["hook"]).__name__ == "_Opaque"
    state = loaded["state_dict"]
    assert state.keys() == net.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_postprocessing_defaults_come_from_the_checkpoint_recipe():
    """A checkpoint trained with a DBNet recipe (epsilon 0.01, as MMOCR's DBNet configs) is
    post-processed with that recipe's settings unless the caller says otherwise."""
    from dbnetpp.config import get_config
    from dbnetpp.models.dbnet import build_model

    net = build_model("dbnet_resnet18_tiny")
    config = get_config("tiny_dbnet", model={"epsilon_ratio": 0.01, "text_repr_type": "poly"}).to_dict()
    checkpoint = {"model": net.state_dict(), "model_name": "dbnet_resnet18_tiny", "config": config}
    stored = Detector(checkpoint)
    assert (stored.postprocessor.epsilon_ratio, stored.postprocessor.text_repr_type) == (0.01, "poly")
    explicit = Detector(checkpoint, epsilon_ratio=0.002, text_repr_type="quad")
    assert (explicit.postprocessor.epsilon_ratio, explicit.postprocessor.text_repr_type) == (0.002, "quad")
    bare = Detector({"model": net.state_dict(), "model_name": "dbnet_resnet18_tiny"})
    assert (bare.postprocessor.epsilon_ratio, bare.postprocessor.text_repr_type) == (0.002, "quad")


# ----------------------------------------------------------------------------- a model name brings its recipe


def test_every_model_name_has_its_recipes_test_settings():
    """MMOCR's configs: DBNet epsilon 0.01 / DBNet++ 0.002, ResNet-18 at 1333x736, ResNet-50 at 4068x1024."""
    for name in MODEL_NAMES:
        recipe = inference_recipe(name)
        assert recipe is not None and recipe.text_repr_type == "quad", name
        assert recipe.epsilon_ratio == (0.002 if name.startswith("dbnetpp_") or "tiny" in name else 0.01), name
        if "tiny" in name:  # the CPU presets: 256 x 256 synthetic images, the DBNet++ tested at 1.25x
            assert recipe.test_scale == ((640, 320) if name.startswith("dbnetpp") else (512, 256)), name
        else:
            assert recipe.test_scale == ((1333, 736) if "resnet18" in name else (4068, 1024)), name
    assert inference_recipe("no_such_model") is None


@pytest.fixture(scope="module")
def mmocr_r18_checkpoint(tmp_path_factory):
    """An MMOCR-format checkpoint (``state_dict`` + ``meta``) of the DBNet R18 architecture."""
    net = build_model("dbnet_resnet18_fpnc_1200e_icdar2015")
    path = tmp_path_factory.mktemp("mmocr_r18") / "dbnet_r18.pth"
    keys = {k: v.shape for k, v in net.state_dict().items()}
    torch.save({"meta": {"epoch": 1200}, "state_dict": random_state_dict(keys)}, path)
    return path


def test_mmocr_checkpoint_with_a_recipe_name_runs_that_recipe(mmocr_r18_checkpoint):
    name = "dbnet_resnet18_fpnc_1200e_icdar2015"
    detector = Detector(mmocr_r18_checkpoint, model=name)
    assert detector.test_scale == (1333, 736)
    assert (detector.postprocessor.epsilon_ratio, detector.postprocessor.text_repr_type) == (0.01, "quad")
    # the resize really uses it: a 1280x720 photo goes to 736 on the short side
    tensor, (sx, sy) = detector.preprocess(np.zeros((720, 1280, 3), np.uint8))
    assert tensor.shape[1:] == (736, round(1280 * 736 / 720))
    assert sx == pytest.approx(tensor.shape[2] / 1280) and sy == pytest.approx(736 / 720)
    # explicit arguments win over the recipe
    explicit = Detector(mmocr_r18_checkpoint, model=name, test_scale=(640, 320), epsilon_ratio=0.002)
    assert explicit.test_scale == (640, 320) and explicit.postprocessor.epsilon_ratio == 0.002
    # the builder alias of the architecture takes its ICDAR 2015 recipe
    assert Detector(mmocr_r18_checkpoint, model="dbnet_resnet18").test_scale == (1333, 736)

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dbnetpp.data import ICDAR2015, SyntheticText, TestDataset, TrainDataset, collate_test, collate_train, db_targets
from dbnetpp.data.transforms import train_transform
from dbnetpp.preprocess import MEAN_RGB, STD_RGB, normalize_image

TARGETS = ("shrink_map", "shrink_mask", "thr_map", "thr_mask")


@pytest.fixture(scope="module")
def source():
    return SyntheticText(6, (160, 224), seed=2, cache=True)


def assert_items_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("size", [256, 640])
def test_train_item_format(source, size):
    item = TrainDataset(source, size=size, seed=0)[1]
    assert set(item) == {"image", *TARGETS}
    assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
    for key in TARGETS:
        assert item[key].shape == (size, size) and item[key].dtype == torch.float32
    assert item["shrink_map"].sum() > 0 and item["thr_mask"].sum() > 0
    assert set(item["shrink_map"].unique().tolist()) <= {0.0, 1.0}
    assert item["thr_map"].min() >= 0.3 - 1e-6 and item["thr_map"].max() <= 0.7 + 1e-6


def test_train_item_is_the_pipeline_then_targets(source):
    # independent recomputation: same generator, pipeline, normalisation and targets
    dataset = TrainDataset(source, size=256, seed=4)
    dataset.set_epoch(3)
    item = dataset[2]
    sample = source[2]
    out = train_transform(sample["image"], sample["polygons"], sample["ignore"], np.random.default_rng([4, 3, 2]), 256)
    assert torch.equal(item["image"], normalize_image(out.image))
    targets = db_targets(out.polygons, out.ignore, 256, 256)
    for key in TARGETS:
        assert np.array_equal(item[key].numpy(), targets[key])


def test_padding_is_normalised_black_as_in_mmocr():
    # a wide image: the 256 x 256 output has zero-padded rows at the bottom (uint8 pad, then normalise)
    wide = SyntheticText(1, (64, 640), seed=1)
    dataset = TrainDataset(wide, size=256, seed=0)
    image = dataset[0]["image"]
    black = (-torch.tensor(MEAN_RGB) / torch.tensor(STD_RGB)).view(3, 1)
    assert torch.allclose(image[:, -1, :], black.expand(3, 256))


def test_seed_and_epoch_select_the_random_stream(source):
    a, b, c = (TrainDataset(source, size=128, seed=s) for s in (0, 0, 1))
    assert_items_equal(a[3], b[3])
    assert not torch.equal(a[3]["image"], c[3]["image"])
    b.set_epoch(1)
    assert b.epoch == 1
    assert not torch.equal(a[3]["image"], b[3]["image"])
    a.set_epoch(1)
    assert_items_equal(a[3], b[3])


def test_empty_samples_are_redrawn_and_hopeless_sources_fail_clearly():
    good = SyntheticText(1, 128, seed=0)[0]
    empty = dict(good, polygons=[], ignore=np.zeros(0, bool), texts=[])
    dataset = TrainDataset([empty, good, empty], size=128, seed=0)
    item = dataset[0]  # redrawn until index 1 comes up
    assert item["shrink_map"].sum() > 0
    with pytest.raises(RuntimeError, match="re-draws"):
        TrainDataset([empty, empty], size=64)[0]
    with pytest.raises(KeyError, match="'polygons'"):
        TrainDataset([{"image": good["image"]}], size=64)[0]
    with pytest.raises(ValueError, match="empty"):
        TrainDataset([], size=64)


def test_collate_train(source):
    dataset = TrainDataset(source, size=128, seed=0)
    batch = collate_train([dataset[0], dataset[1], dataset[2]])
    assert batch["image"].shape == (3, 3, 128, 128)
    for key in TARGETS:
        assert batch[key].shape == (3, 128, 128)
    assert torch.equal(batch["thr_map"][1], dataset[1]["thr_map"])


@pytest.mark.slow
def test_dataloader_workers_do_not_change_samples(source):
    dataset = TrainDataset(source, size=96, seed=5)
    kwargs = dict(batch_size=3, shuffle=False, collate_fn=collate_train)
    serial = list(DataLoader(dataset, num_workers=0, **kwargs))
    parallel = list(DataLoader(dataset, num_workers=2, **kwargs))
    assert len(serial) == len(parallel) == 2
    for a, b in zip(serial, parallel):
        assert_items_equal(a, b)


@pytest.mark.slow
def test_set_epoch_reaches_persistent_workers(source):
    dataset = TrainDataset(source, size=96, seed=5)
    loader = DataLoader(dataset, batch_size=6, num_workers=2, persistent_workers=True, collate_fn=collate_train)
    seen = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        seen.append(next(iter(loader)))
    for epoch, batch in enumerate(seen):
        reference = TrainDataset(source, size=96, seed=5)
        reference.set_epoch(epoch)
        assert_items_equal(batch, collate_train([reference[i] for i in range(6)]))
    assert not torch.equal(seen[0]["image"], seen[1]["image"])


def test_test_dataset_resizes_and_keeps_original_ground_truth():
    image = np.random.default_rng(0).integers(0, 256, size=(720, 1280, 3), dtype=np.uint8)
    polys = [np.array([[10, 10], [50, 10], [50, 30], [10, 30]], np.float32)]
    sample = {"image": image, "polygons": polys, "ignore": np.array([False]), "texts": ["a"], "path": "x/img_1.jpg",
              "ori_size": (720, 1280)}
    item = TestDataset([sample])[0]
    assert item["image"].shape == (3, 1024, 1820)
    assert item["scale"] == (1820 / 1280, 1024 / 720)
    expected = normalize_image(cv2.resize(image, (1820, 1024), interpolation=cv2.INTER_LINEAR))
    assert torch.equal(item["image"], expected)
    assert np.array_equal(item["polygons"][0], polys[0]) and item["path"] == "x/img_1.jpg"
    assert item["ori_size"] == (720, 1280) and item["ignore"].tolist() == [False]

    small = TestDataset([sample], scale=(640, 360))[0]
    assert small["image"].shape == (3, 360, 640)
    batch = collate_test([item, small])
    assert batch["images"].shape == (2, 3, 1024, 1824)  # padded to multiples of 32
    assert torch.equal(batch["images"][1, :, :360, :640], small["image"])
    assert batch["images"][1, :, 360:].abs().sum() == 0
    assert batch["scale"] == [item["scale"], small["scale"]] and batch["path"] == ["x/img_1.jpg"] * 2
    assert len(batch["polygons"]) == len(batch["ignore"]) == len(batch["ori_size"]) == 2


def test_real_icdar_test_split(icdar_root):
    dataset = TestDataset(ICDAR2015(icdar_root, "test"))
    item = dataset[0]
    assert item["image"].shape == (3, 1024, 1820)
    assert item["scale"] == pytest.approx((1.421875, 1.4222222))
    assert item["ori_size"] == (720, 1280)
    train = TrainDataset(ICDAR2015(icdar_root, "test"), size=640, seed=0)[5]
    assert train["image"].shape == (3, 640, 640)

"""Two Gloo processes on the CPU: DDP training equals one process with the whole batch,
collectives behave, and distributed evaluation counts every test image exactly once."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dbnetpp import distributed as du
from dbnetpp.engine import evaluate, train_one_epoch
from dbnetpp.metric import HmeanIoU

BATCH_PER_RANK = 3
STEPS = 3
WORLD = 2
NUM_TEST = 5  # odd, so DistributedSampler pads one rank with a duplicate


class TinyNet(nn.Module):
    """conv -> BN (frozen: eval mode even in train()) -> ReLU -> conv; returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 1, 1)

    def train(self, mode: bool = True) -> "TinyNet":
        super().train(mode)
        self.bn.eval()  # norm_eval: per-rank batch statistics would differ from the full batch
        return self

    def forward(self, x: torch.Tensor) -> dict:
        return {"out": self.conv2(torch.relu(self.bn(self.conv1(x)))).squeeze(1)}


def mse_criterion(outputs: dict, targets: dict) -> dict:
    diff = outputs["out"] - targets["target"]
    loss = (diff**2).mean()
    return {"loss": loss, "loss_abs": diff.abs().mean().detach()}


def fixed_data():
    g = torch.Generator().manual_seed(123)
    images = torch.randn(STEPS, WORLD * BATCH_PER_RANK, 3, 8, 8, generator=g)
    targets = torch.randn(STEPS, WORLD * BATCH_PER_RANK, 8, 8, generator=g)
    return images, targets


def make_model() -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():  # non-trivial frozen statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


class RecordingLogger:
    def __init__(self) -> None:
        self.records = []

    def log(self, record: dict) -> None:
        self.records.append(dict(record))


class IndexImages(Dataset):
    """Image i is filled with the value i; ground truth: one box per image, shifted by i."""

    def __len__(self) -> int:
        return NUM_TEST

    def __getitem__(self, i: int) -> dict:
        box = np.array([[2, 2], [20, 2], [20, 12], [2, 12]], np.float32) + i
        return {"image": torch.full((3, 32, 32), float(i)), "polygons": [box], "ignore": np.array([False])}


def collate(samples: list) -> dict:
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "scale": [(1.0, 1.0)] * len(samples),
        "polygons": [s["polygons"] for s in samples],
        "ignore": [s["ignore"] for s in samples],
    }


def fake_postprocessor(prob_map: np.ndarray, scale=None):
    """Image i: a hit when i is even, a miss (far away box) when odd; score 0.9."""
    i = int(round(float(prob_map[0, 0])))
    box = np.array([[2, 2], [20, 2], [20, 12], [2, 12]], np.float32) + i
    if i % 2:
        box = box + 100
    return [box], [0.9]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    info = du.init_distributed("cpu")
    try:
        result = {"rank": info.rank, "world": info.world_size, "backend": torch.distributed.get_backend()}
        model = nn.parallel.DistributedDataParallel(make_model())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        images, targets = fixed_data()
        shard = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
        loader = [{"images": images[s, shard], "target": targets[s, shard]} for s in range(STEPS)]
        logger = RecordingLogger()
        train_one_epoch(
            model, mse_criterion, optimizer, loader, info.device, 0, log_interval=1, logger=logger, progress=False
        )
        result["weights"] = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
        result["records"] = logger.records

        result["gathered"] = du.all_gather_object({"rank": rank, "payload": [rank] * (rank + 1)})
        result["broadcast"] = du.broadcast_object(f"from {rank}", src=1)
        result["reduced"] = {k: float(v) for k, v in du.reduce_dict({"a": torch.tensor(float(rank + 1))}).items()}

        test_set = IndexImages()
        sampler = DistributedSampler(test_set, shuffle=False)
        test_loader = DataLoader(test_set, batch_size=2, sampler=sampler, collate_fn=collate)
        result["eval"] = evaluate(
            lambda x: x[:, 0], test_loader, info.device, fake_postprocessor, HmeanIoU, progress=False
        )
        result["is_main"] = du.is_main_process()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        du.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    # fork: the children inherit the imported modules (spawning re-imports torch: slow on 2 cores)
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def single_process_reference():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    images, targets = fixed_data()
    loader = [{"images": images[s], "target": targets[s]} for s in range(STEPS)]
    logger = RecordingLogger()
    train_one_epoch(
        model, mse_criterion, optimizer, loader, torch.device("cpu"), 0, log_interval=1, logger=logger, progress=False
    )
    return model.state_dict(), logger.records


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_double_batch(ddp_results):
    ref_weights, ref_records = single_process_reference()
    start = make_model().state_dict()
    for result in ddp_results:
        assert result["world"] == WORLD and result["backend"] == "gloo"
        max_delta = max((result["weights"][k].float() - ref_weights[k].float()).abs().max().item() for k in ref_weights)
        assert max_delta <= 1e-5, max_delta
    # the test is not vacuous: three steps moved the weights
    moved = max((ref_weights[k].float() - start[k].float()).abs().max().item() for k in ref_weights)
    assert moved > 1e-3
    # logged losses are averaged over ranks: with equal shards that is the full-batch loss
    assert len(ddp_results[1]["records"]) == 0  # only rank 0 logs
    assert len(ddp_results[0]["records"]) == STEPS
    for got, want in zip(ddp_results[0]["records"], ref_records):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["images_per_s"] > 0 and got["iter"] == want["iter"]


@pytest.mark.slow
def test_collectives(ddp_results):
    for rank, result in enumerate(ddp_results):
        assert result["rank"] == rank
        assert result["is_main"] == (rank == 0)
        assert result["gathered"] == [{"rank": 0, "payload": [0]}, {"rank": 1, "payload": [1, 1]}]
        assert result["broadcast"] == "from 1"
        assert result["reduced"] == {"a": pytest.approx(1.5)}


@pytest.mark.slow
def test_distributed_evaluation_counts_each_image_once(ddp_results):
    metric = HmeanIoU()  # independent single-process computation over the 5 images
    test_set = IndexImages()
    for i in range(NUM_TEST):
        sample = test_set[i]
        polygons, scores = fake_postprocessor(sample["image"][0].numpy())
        metric.update(polygons, scores, sample["polygons"], sample["ignore"])
    want = metric.compute()
    assert want["recall"] == pytest.approx(3 / 5)  # images 0, 2, 4 hit
    for result in ddp_results:
        got = result["eval"]
        assert got["num_images"] == NUM_TEST
        for key in ("precision", "recall", "hmean"):
            assert got[key] == pytest.approx(want[key])


def test_single_process_helpers_degrade_to_no_ops(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = du.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert du.get_rank() == 0 and du.get_world_size() == 1 and du.is_main_process()
    assert du.all_gather_object({"x": 1}) == [{"x": 1}]
    assert du.broadcast_object(5) == 5
    values = {"a": torch.tensor(2.0)}
    assert du.reduce_dict(values) is values
    du.barrier()
    du.cleanup()


def test_init_distributed_rejects_bad_devices():
    with pytest.raises(ValueError, match="mps|cpu or cuda"):
        du.init_distributed("mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            du.init_distributed("cuda")


def test_failure_helpers_in_one_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert du.any_rank(True) is True and du.any_rank(False) is False
    assert du.report_failure(0, "epoch 2, iteration 5 (step 21)") == "rank 0 gave up at epoch 2, iteration 5 (step 21)"
    dog = du.StepWatchdog(0, 5.0, enabled=False)
    dog.arm("epoch 0, iteration 0 (step 0)")
    assert dog.where == "epoch 0, iteration 0 (step 0)"
    dog.disarm()
    with pytest.raises(ValueError, match="timeout_s"):
        du.init_distributed("cpu", timeout_s=0)

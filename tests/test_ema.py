"""dbnetpp.ema.WeightEMA: the average it keeps, where it is used (evaluation, checkpoints for
inference) and where it is not (resuming trains the raw weights)."""

import pytest
import torch
from torch import nn

from dbnetpp.checkpoint import load_model_weights, save_checkpoint
from dbnetpp.config import get_config
from dbnetpp.detector import Detector
from dbnetpp.ema import WeightEMA
from dbnetpp.models.dbnet import build_model


def test_average_follows_the_formula_for_weights_and_buffers():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = WeightEMA(net, decay=0.5)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    history = [start]
    for step in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(step + 1.0)
        net.train()(torch.randn(4, 3))  # moves the running statistics and num_batches_tracked
        history.append({k: v.clone() for k, v in net.state_dict().items()})
        ema.update(net)
    # by hand: d_n = min(0.5, (1 + n) / (10 + n)) = 0.1, 2/11, 3/12 (all under 0.5)
    for key, first in start.items():
        want = first.double() if first.is_floating_point() else None
        for n, state in enumerate(history[1:]):
            d = min(0.5, (1 + n) / (10 + n))
            if want is not None:
                want = d * want + (1 - d) * state[key].double()
        got = ema.module.state_dict()[key]
        if want is None:
            assert torch.equal(got, history[-1][key])  # integer buffers are copied
        else:
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert ema.updates == 3 and not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(net, decay=1.0)


def test_state_round_trip():
    net = nn.Linear(2, 2)
    ema = WeightEMA(net, 0.9)
    with torch.no_grad():
        net.weight.add_(1)
    ema.update(net)
    other = WeightEMA(nn.Linear(2, 2), 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and torch.equal(other.module.weight, ema.module.weight)
    assert other.current_decay() == ema.current_decay()


def test_checkpoint_gives_the_averaged_weights_for_inference_and_the_raw_ones_to_resume(tmp_path):
    torch.manual_seed(0)
    raw, averaged = build_model("dbnet_resnet18_tiny"), build_model("dbnet_resnet18_tiny")
    path = tmp_path / "last.pth"
    save_checkpoint({"model": raw.state_dict(), "model_name": raw.name, "epoch": 0,
                     "ema": {"model": averaged.state_dict(), "updates": 7, "decay": 0.99}}, path)  # fmt: skip
    for want, kwargs in ((averaged, {}), (raw, {"averaged": False})):
        net = build_model("dbnet_resnet18_tiny")
        load_model_weights(net, path, **kwargs)
        for key, value in want.state_dict().items():
            assert torch.equal(net.state_dict()[key], value), key
    detector = Detector(path, prepare=False)
    assert torch.equal(detector.model.state_dict()["neck.lateral_convs.0.conv.weight"],
                       averaged.state_dict()["neck.lateral_convs.0.conv.weight"])  # fmt: skip


def test_config_and_flag():
    assert get_config("tiny").train.ema_decay == 0.995
    assert get_config("mmocr").train.ema_decay is None  # MMOCR's recipes have none
    with pytest.raises(ValueError, match="ema_decay"):
        get_config("tiny", train={"ema_decay": 1.5})


def test_train_script_flag(train_module):
    parse = train_module.get_args_parser().parse_args
    assert train_module.config_from_args(parse(["--preset", "tiny"])).train.ema_decay == 0.995
    assert train_module.config_from_args(parse(["--preset", "tiny", "--ema-decay", "0"])).train.ema_decay is None
    assert train_module.config_from_args(parse(["--preset", "mmocr", "--ema-decay", "0.999"])).train.ema_decay == 0.999

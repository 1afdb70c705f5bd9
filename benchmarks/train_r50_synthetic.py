"""Train MMOCR's DBNet++ R50-DCNv2 on built-in synthetic text on the CPU, for int8 accuracy figures.

From scratch with Adam, the R50-DCNv2 DBNet++ stays on the constant-prediction plateau on this
data (measured: lr 1.5e-3 collapsed to a binary-map dice loss of 1.0 within 65 steps; lr 5e-4 was
still at 0.97 after 230 steps). The small DBNet++ of the main job learns because of two
learning-rate multipliers (``dbnetpp.models.dbnet._small_dbnetpp``: DCN offsets x0.1, ASF
attention x0.005 with a near-zero start). This script trains the R50-DCNv2 DBNet++ with the same
two multipliers through ``examples/train.py`` unchanged (every flag passes through), then
``--fold`` turns a checkpoint of that run into a checkpoint of the plain network
(``build_model("dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015")``, same keys as MMOCR's) by
multiplying the multipliers into the weights, and checks the two give the same probability map:

    python benchmarks/train_r50_synthetic.py --preset tiny --no-pretrained --epochs 12 --work-dir runs/r50
    python benchmarks/train_r50_synthetic.py --fold runs/r50/best.pth runs/r50/plain.pth
    python benchmarks/precision_accuracy.py --weights runs/r50/plain.pth --precision int8 --precision bf16

``--model`` is set to the R50-DCNv2 DBNet++. The fold prints one JSON line.
"""

import json
import runpy
import sys
from pathlib import Path

import torch
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dbnetpp.models.dbnet as dbnet  # noqa: E402
from dbnetpp.checkpoint import load_model_weights  # noqa: E402
from dbnetpp.models.dcn import ModulatedDeformConv2d  # noqa: E402
from dbnetpp.weights import load_state_dict_file  # noqa: E402

R50_DCN = "dbnetpp_resnet50-dcnv2_fpnc_1200e_icdar2015"


def build_with_multipliers(name: str, **overrides) -> dbnet.DBNet:
    """The network of ``name`` with the small DBNet++'s learning-rate multipliers."""
    _, values = dbnet._TABLE[name]
    return dbnet._small_dbnetpp(name, **{**values, **overrides})


def fold(source: str, target: str) -> dict:
    """Checkpoint ``source`` (a run of this script) -> plain-network checkpoint ``target``."""
    trained = build_with_multipliers(R50_DCN).eval()
    load_model_weights(trained, source)  # the EMA weights the run evaluated, if it kept them
    x = torch.randn(1, 3, 256, 320, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained(x)
    for m in trained.modules():
        if parametrize.is_parametrized(m):  # weight = scale x stored
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        if isinstance(m, ModulatedDeformConv2d):  # offsets and mask logits = scale x conv_offset(x)
            hooks = m.conv_offset._forward_hooks
            ((key, hook),) = hooks.items()
            with torch.no_grad():
                m.conv_offset.weight.mul_(hook.scale)
                m.conv_offset.bias.mul_(hook.scale)
            del hooks[key]
    plain = dbnet.build_model(R50_DCN).eval()
    plain.load_state_dict(trained.state_dict(), strict=True)
    with torch.no_grad():
        got = plain(x)
    error = (got - want).abs().max().item()
    if error > 1e-4:
        raise SystemExit(f"folding changed the probability map by {error:.3g}")
    checkpoint = load_state_dict_file(source)
    checkpoint = {k: v for k, v in checkpoint.items() if k not in ("ema", "optimizer", "scheduler", "scaler")}
    checkpoint["model"] = plain.state_dict()
    torch.save(checkpoint, target)
    return {"benchmark": "train_r50_synthetic", "folded": target, "source": source, "max_abs_map_diff": error}


def main(argv: list) -> None:
    if argv[:1] == ["--fold"]:
        if len(argv) != 3:
            raise SystemExit("usage: train_r50_synthetic.py --fold SOURCE.pth TARGET.pth")
        print(json.dumps(fold(argv[1], argv[2])), flush=True)
        return
    plain_build = dbnet.build_model

    def build(name: str, **overrides) -> dbnet.DBNet:
        return build_with_multipliers(name, **overrides) if name == R50_DCN else plain_build(name, **overrides)

    dbnet.build_model = build  # examples/train.py imports it by name when it runs
    root = Path(__file__).resolve().parents[1]
    sys.argv = [str(root / "examples" / "train.py"), *argv, "--model", R50_DCN]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])

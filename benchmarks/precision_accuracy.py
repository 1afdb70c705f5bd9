"""H-mean of a trained model at float32 and at lower precision, on its held-out synthetic split.

For checkpoints of ``examples/train.py`` trained on synthetic text (the tiny preset): the held-out
images are rebuilt from the checkpoint's config (``data.synthetic_test_*``), and int8 is calibrated
on the first ``--calibration-images`` *training* images (``data.synthetic_train_seed``), never on
held-out ones.

    python benchmarks/precision_accuracy.py --weights runs/tiny/best.pth [--precision int8 --precision bf16]

Prints one JSON line per ``dtype`` (fp32 first): H-mean, precision, recall and the difference to float32, with
the CPU name and ISA.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dbnetpp.cpuinfo import cpu_info  # noqa: E402
from dbnetpp.data import SyntheticText  # noqa: E402
from dbnetpp.detector import Detector  # noqa: E402
from dbnetpp.metric import HmeanIoU  # noqa: E402
from dbnetpp.weights import load_state_dict_file  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True, help="dbnetpp checkpoint trained on synthetic text")
    parser.add_argument("--precision", action="append", choices=("bf16", "int8"), default=None)
    parser.add_argument("--calibration-images", type=int, default=8, help="training images to calibrate on")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def hmean_of(detector: Detector, test_set: SyntheticText) -> dict:
    metric = HmeanIoU()
    for i in range(len(test_set)):
        sample = test_set[i]
        detections = detector.detect(sample["image"])
        metric.update([p for p, _ in detections], [s for _, s in detections], sample["polygons"], sample["ignore"])
    result = metric.compute()
    return {k: round(float(result[k]), 4) for k in ("hmean", "precision", "recall")}


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    data = load_state_dict_file(args.weights)["config"]["data"]
    kwargs = dict(size=data["synthetic_size"], words_per_image=tuple(data["synthetic_words"]))
    test_set = SyntheticText(data["synthetic_test_images"], seed=data["synthetic_test_seed"], **kwargs)
    train_set = SyntheticText(args.calibration_images, seed=data["synthetic_train_seed"], **kwargs)
    calibration = [train_set[i]["image"] for i in range(len(train_set))]
    common = {"weights": str(args.weights), "held_out_images": len(test_set), **cpu_info()}
    start = time.perf_counter()
    reference = hmean_of(Detector(args.weights), test_set)
    print(json.dumps({"dtype": "fp32", **reference, "seconds": round(time.perf_counter() - start, 1), **common}))
    for precision in args.precision or ["int8"]:
        start = time.perf_counter()
        options = {"calibration": calibration} if precision == "int8" else {}
        detector = Detector(args.weights, precision=precision, **options)
        result = hmean_of(detector, test_set)
        record = {
            "dtype": precision,
            **result,
            "hmean_minus_fp32": round(result["hmean"] - reference["hmean"], 4),
            "calibration_images": len(calibration) if precision == "int8" else None,
            "seconds": round(time.perf_counter() - start, 1),
            **common,
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())

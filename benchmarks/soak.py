"""Soak: resident memory of long runs, sampled as they go (Linux: /proc/PID/status).

1. ``dbnetpp detect`` over N synthetic images (default 300, 640x480 to 1280x720 JPEGs) with an
   untrained small DBNet (or ``--weights``), one process, RSS read after every image;
2. ``examples/train.py --preset tiny`` for M iterations (default 1000; ``--max-iters`` with an
   evaluation every M/4), RSS of the training process read every ``--every`` seconds once 10 %
   of the steps are done.

    python benchmarks/soak.py [--images 300] [--iters 1000] [--skip-train] [--skip-detect]

Prints one JSON line per run: RSS after warm-up (10 % of the images / steps), at the end, the
maximum, the growth end - warm, with the CPU name and ISA. No assertion: tests/test_soak.py
checks a short run.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dbnetpp.cpuinfo import cpu_info  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan  # a process that has exited (zombie) has no VmRSS


def summary(name: str, samples: List[float], **extra) -> Dict:
    """Warm = the sample at 10 % of the run (detect: of the images; train: samples start at 10 %
    of the steps, so its first one)."""
    warm = samples[len(samples) // 10] if name == "soak_detect" else samples[0]
    return {
        "bench": name, "samples": len(samples), "rss_warm_mib": round(warm, 1),
        "rss_end_mib": round(samples[-1], 1), "rss_max_mib": round(max(samples), 1),
        "growth_after_warmup_mib": round(samples[-1] - warm, 1),
        "rss_deciles_mib": [round(samples[min(len(samples) - 1, k * len(samples) // 10)], 1) for k in range(11)],
        **extra, **cpu_info(),
    }  # fmt: skip


def soak_detect(count: int, weights: str, work: Path) -> Dict:
    import cv2
    import torch

    import dbnetpp.cli as cli
    from dbnetpp.models.dbnet import build_model

    rng = np.random.default_rng(0)
    folder = work / "images"
    folder.mkdir()
    sizes = [(480, 640), (720, 1280), (600, 800), (1024, 768)]
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        image = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (5, 5), 0)
        cv2.imwrite(str(folder / f"img_{i}.jpg"), image)
    if not weights:
        torch.manual_seed(0)
        model = build_model("dbnet_resnet18_tiny")
        weights = str(work / "tiny.pth")
        torch.save({"model": model.state_dict(), "model_name": model.name, "epoch": 0}, weights)
    samples: List[float] = []
    write = cli.write_result_file

    def write_and_sample(*args, **kwargs):
        write(*args, **kwargs)
        samples.append(rss_mib(os.getpid()))

    cli.write_result_file = write_and_sample
    start = time.perf_counter()
    status = cli.main(["detect", str(folder), "--weights", weights, "--out", str(work / "out"), "--no-vis"])
    return summary("soak_detect", samples, images=count, status=status, seconds=round(time.perf_counter() - start))


def _last_step(log: Path) -> int:
    """The newest optimiser step in a run's log.jsonl (0 before the first logged one)."""
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("type") == "train":
            return int(record["step"])
    return 0


def soak_train(iters: int, every: float, work: Path) -> Dict:
    """RSS of the training process after each sampled step; warm = when 10 % of the steps are done
    (the synthetic sets are drawn and the first evaluation is behind)."""
    cmd = [sys.executable, str(REPO / "examples" / "train.py"), "--preset", "tiny", "--max-iters", str(iters),
           "--eval-interval", str(max(1, iters // 4)), "--log-interval", "1", "--work-dir", str(work / "train"),
           "--no-progress"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples: List[float] = []
    warm_at = max(1, iters // 10)
    while proc.poll() is None:
        step = _last_step(work / "train" / "log.jsonl")
        try:
            rss = rss_mib(proc.pid)
        except OSError:
            break
        if step >= warm_at and math.isfinite(rss):
            samples.append(rss)
        time.sleep(every)
    err = proc.stderr.read() if proc.stderr else ""
    seconds = round(time.perf_counter() - start)
    error = err.strip().splitlines()[-1] if proc.returncode and err.strip() else None
    return summary("soak_train", samples or [math.nan], iters=iters, status=proc.returncode, seconds=seconds,
                   error=error)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--every", type=float, default=1.0, help="seconds between training RSS samples")
    p.add_argument("--weights", default="", help="detector weights (default: an untrained small DBNet)")
    p.add_argument("--skip-detect", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dbnetpp_soak_") as tmp:
        if not args.skip_detect:
            (Path(tmp) / "d").mkdir()
            print(json.dumps(soak_detect(args.images, args.weights, Path(tmp) / "d")), flush=True)
        if not args.skip_train:
            (Path(tmp) / "t").mkdir()
            print(json.dumps(soak_train(args.iters, args.every, Path(tmp) / "t")), flush=True)


if __name__ == "__main__":
    main()

"""The README's main job, run as a user runs it, for several seeds: one JSON line per run.

    python benchmarks/main_job.py --seeds 0 1 2 --out runs/main_job

Each run is ``python examples/train.py --preset tiny --work-dir DIR --seed S`` in a fresh process
(extra arguments after ``--`` are passed on). The line gives the H-mean curve (seconds since the
start of the process, including drawing the synthetic sets, and the H-mean of every evaluation),
the first time H-mean reached ``--target``, the final and best H-mean, the wall time, the versions
of torch, OpenCV and numpy, and the CPU's name and ISA. ``--python`` runs the job with another
interpreter (a scratch venv with another OpenCV, say). A last line summarises all runs.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dbnetpp.cpuinfo import cpu_info  # noqa: E402

VERSIONS = """
import json, platform, cv2, numpy, torch
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "opencv": cv2.__version__,
                  "numpy": numpy.__version__, "threads": torch.get_num_threads(),
                  "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}))
"""


def run_once(python: str, seed: int, work_dir: Path, extra: List[str], target: float) -> Dict[str, Any]:
    cmd = [python, "examples/train.py", "--preset", "tiny", "--work-dir", str(work_dir), "--seed", str(seed),
           "--no-progress", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    record: Dict[str, Any] = {"seed": seed, "command": " ".join(cmd[1:]), "status": proc.returncode,
                              "wall_s": round(wall, 1)}
    if proc.returncode != 0:
        record["error"] = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return record
    evals = []
    for line in (work_dir / "log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("type") == "eval":
            evals.append((round(entry["elapsed_s"], 1), round(entry["hmean"], 4)))
    reached = next((t for t, h in evals if h >= target), None)
    record.update(
        curve=evals,
        reached_s=reached,
        final_hmean=evals[-1][1] if evals else None,
        best_hmean=max((h for _, h in evals), default=None),
    )
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/main_job", help="work dirs go to OUT/seed_S")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the job")
    parser.add_argument("--target", type=float, default=0.90, help="H-mean whose first crossing is reported")
    parser.add_argument("extra", nargs="*", help="more examples/train.py arguments (after --)")
    args = parser.parse_args()

    versions = json.loads(subprocess.run([args.python, "-c", VERSIONS], capture_output=True, text=True,
                                         check=True).stdout)
    facts = {**cpu_info(), **versions}
    runs = []
    for seed in args.seeds:
        work_dir = Path(args.out) / f"seed_{seed}"
        if (work_dir / "log.jsonl").exists():
            (work_dir / "log.jsonl").unlink()  # a fresh run, not a resumed one
        record = run_once(args.python, seed, work_dir, args.extra, args.target)
        runs.append(record)
        print(json.dumps({"run": "main_job", **record, **facts}), flush=True)
    reached = [r.get("reached_s") for r in runs]
    finals = [r["final_hmean"] for r in runs if r.get("final_hmean") is not None]
    print(json.dumps({
        "summary": "main_job", "seeds": args.seeds, "target": args.target,
        "all_reached": all(t is not None for t in reached),
        "latest_reach_s": max((t for t in reached if t is not None), default=None),
        "median_final_hmean": statistics.median(finals) if finals else None, **facts,
    }), flush=True)


if __name__ == "__main__":
    main()

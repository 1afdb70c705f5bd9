"""benchmarks/gpu_check.py: without a GPU it says so and exits 0; its checks run on the CPU (--quick)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run(*args, env_extra=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)  # fmt: skip


def test_without_gpu_prints_one_line_and_exits_0(tmp_path):
    proc = run("--out", tmp_path / "gpu.jsonl", env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["check"] == "cuda" and record["available"] is False and "no CUDA GPU" in record["message"]
    assert json.loads((tmp_path / "gpu.jsonl").read_text()) == record


@pytest.mark.slow
def test_checks_run_on_the_cpu(tmp_path):
    """The CUDA checks' code on the CPU at tiny sizes: every line is JSON, every check passes or is
    skipped, the summary counts them; the numbers are real comparisons (CPU float32 vs float64)."""
    checks = ["env", "dcn", "model_tiny", "amp_bf16", "amp_fp16", "nccl", "speed_infer"]
    proc = run("--device", "cpu", "--quick", "--checks", *checks, "--out", tmp_path / "out.jsonl")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert records == [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["check"] for r in records if r["check"] != "summary"][0] == "env"
    assert {r["check"] for r in records} == set(checks) | {"summary"}
    failed = [r for r in records if r["ok"] is False]
    assert not failed, failed
    dcn = [r for r in records if r["check"] == "dcn"]
    assert {(r["impl"], r["stride"]) for r in dcn} == {(i, s) for i in ("torchvision", "fast") for s in (1, 2)}
    assert all(0 < max(r["rel_err"].values()) <= r["tolerance"] for r in dcn)  # float32 vs float64: not 0
    assert next(r for r in records if r["check"] == "amp_fp16")["skipped"]
    speed = [r for r in records if r["check"] == "speed_infer"]
    assert [r["precision"] for r in speed] == ["fp32", "bf16"] and all(r["median_ms"] > 0 for r in speed)
    summary = records[-1]
    assert summary["check"] == "summary" and summary["ok"] is True and summary["checks"] == len(checks)



@pytest.mark.slow
def test_compile_checks_run_on_the_cpu(tmp_path):
    """The sync-free and compiled-training checks' code on the CPU (--quick: tiny model, dynamo's
    backend "eager", fullgraph, instead of inductor): an eager and a compiled step each run, and the
    speed line has both rates."""
    pytest.importorskip("torch.library", reason="torch.library")
    import torch

    if not hasattr(torch.library, "custom_op"):
        pytest.skip("whole-graph compile of the DCN needs torch >= 2.4")
    proc = run("--device", "cpu", "--quick", "--checks", "sync_free", "compile_train")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert not [r for r in records if r["ok"] is False], records
    assert [r["mode"] for r in records if r["check"] == "sync_free"] == ["eager", "compiled"]
    speed = next(r for r in records if r["check"] == "compile_train")
    assert speed["eager_images_per_s"] > 0 and speed["compiled_images_per_s"] > 0 and speed["backend"] == "eager"

"""Restarts, preemption, rotation, iteration-based runs and error lines of examples/train.py.

The fast tests check the pieces (sampler order, round agreement on a store with a dead
round's keys, rotation, checkpoint discovery); the slow ones run the training script
in-process (single process) and under torchrun (2 CPU processes) with the drills of issue 12.
"""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import load_train_script
from torch.utils.data import DistributedSampler

from dbnetpp import distributed as du
from dbnetpp.checkpoint import CheckpointError, read_checkpoint, rotate_checkpoints, save_checkpoint
from dbnetpp.config import get_config
from dbnetpp.meters import read_jsonl
from dbnetpp.resume import find_resume_checkpoint, resume_position
from dbnetpp.sampler import ResumableSampler
from dbnetpp.schedules import learning_rates, lr_at_step

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train.py"
# 16 synthetic images of 128 px, 2 per process and step: 8 steps per epoch in one process,
# 4 with two; any model the tiny preset names.
MICRO = [
    "--preset", "tiny_dbnet", "--synthetic-images", "16", "4", "--train-size", "128", "--batch-size", "2",
    "--log-interval", "1", "--no-progress", "--threads", "1", "--workers", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def train_module():
    return load_train_script("dbnetpp_train_script_resilience")


def max_weight_delta(a, b):
    return max((a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in a["model"])


# --- pieces -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n, world", [(10, 1), (10, 3), (7, 2)])
def test_resumable_sampler_orders_like_distributed_sampler_and_skips(n, world):
    data = list(range(n))
    for rank in range(world):
        ours = ResumableSampler(n, world, rank, seed=5)
        ref = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=5)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == list(ref) and len(ours) == len(ref)
            full = list(ours)
            ours.set_epoch(epoch, start=2)
            assert list(ours) == full[2:] and len(ours) == len(full) - 2
            assert ours.state(1) == {"epoch": epoch, "position": 3}
    with pytest.raises(ValueError, match="start"):
        ResumableSampler(4).set_epoch(0, start=5)


def _agree(store, world, out, rank):
    out[rank] = du._agree_on_round(store, rank, world, timeout_s=20)


def test_round_agreement_ignores_a_dead_rounds_keys():
    """The restart bug: a store that still holds the previous round's keys. Every rank must
    agree on a new round id, never on one a dead process left behind."""
    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=20))
    # what a killed round leaves: a rank's hello, rank 0's answer to it, an acknowledgement
    store.set("dbnetpp/hello/1", "stale-nonce")
    store.set("dbnetpp/answer/stale-nonce", "old-round")
    store.set("dbnetpp/ack/old-round/1", "1")
    for _ in range(3):  # three rounds on the same store, ranks starting in either order
        out = {}
        threads = [threading.Thread(target=_agree, args=(store, 3, out, r)) for r in (2, 1, 0)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(30)
        assert len(set(out.values())) == 1 and "old-round" not in out.values(), out
        store.set("dbnetpp/answer/stale-nonce", out[0])  # the next round finds this round's keys


def test_rotation_keeps_the_newest_and_find_resume_picks_the_newest_complete(tmp_path):
    state = {"model": {"w": torch.zeros(1)}, "model_name": "m", "optimizer": {}, "epoch": 0}
    for n in (2, 4, 6, 8, 10):
        save_checkpoint(state, [tmp_path / f"epoch_{n}.pth"])
    for n in (30, 5, 100):
        save_checkpoint(state, [tmp_path / f"iter_{n}.pth"])
    (tmp_path / "best.pth").write_bytes(b"x")
    deleted = rotate_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in deleted) == ["epoch_2.pth", "epoch_4.pth", "epoch_6.pth", "iter_5.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pth", "epoch_10.pth", "epoch_8.pth", "iter_100.pth", "iter_30.pth"
    ]  # fmt: skip
    with pytest.raises(ValueError):
        rotate_checkpoints(tmp_path, keep_last=0)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert find_resume_checkpoint(empty) is None and find_resume_checkpoint(tmp_path / "missing") is None
    save_checkpoint({**state, "epoch": 1}, [empty / "last.pth", empty / "epoch_2.pth"])
    assert find_resume_checkpoint(empty).name == "last.pth"  # same write: last.pth wins the tie
    time.sleep(0.02)
    # the newest is unreadable: refused, naming it (a run from an older one would overwrite it)
    (empty / "iter_9.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="iter_9.pth.*not a readable checkpoint"):
        find_resume_checkpoint(empty)
    assert (empty / "iter_9.pth").read_bytes() == b"not a checkpoint"
    (empty / "iter_9.pth").unlink()  # moved away by the user: the one before is resumed
    assert find_resume_checkpoint(empty).name == "last.pth"
    time.sleep(0.02)
    torch.save({"state_dict": {}}, empty / "iter_10.pth")  # newest, readable, not ours: refused too
    with pytest.raises(CheckpointError, match="iter_10.pth.*not a dbnetpp training checkpoint"):
        find_resume_checkpoint(empty)


def test_resume_position():
    end_of_epoch = {"epoch": 2, "global_step": 24}
    assert resume_position(end_of_epoch, 8, 0, 2) == (3, 0, 24)
    assert resume_position({"epoch": 2}, 8, 0, 1) == (3, 0, 24)  # written before steps were counted
    mid = {"epoch": 2, "iter_in_epoch": 5, "global_step": 29, "sampler": [{"epoch": 3, "position": 10}] * 2}
    assert resume_position(mid, 8, 1, 2) == (3, 5, 29)
    with pytest.warns(UserWarning, match="restarts from its first batch"):
        assert resume_position(mid, 8, 0, 4) == (3, 0, 24)


# --- the training script, in-process --------------------------------------------------------


def run_status(train_module, capsys, *argv):
    status = train_module.run(list(argv))
    return status, capsys.readouterr()


def test_bad_input_ends_with_one_error_line(tmp_path, train_module, capsys, monkeypatch):
    monkeypatch.delenv("DBNETPP_DEBUG", raising=False)
    work = ["--work-dir", str(tmp_path / "w")]
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {"backbone.x": torch.zeros(1)}}, foreign)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00 not a torch file")
    cases = [
        (["--data", str(tmp_path / "nowhere")], "no such directory"),
        (["--resume", str(garbage)], "not a readable checkpoint"),
        (["--resume", str(foreign)], "not a dbnetpp training checkpoint"),
        (["--resume", str(tmp_path / "absent.pth")], "not found"),
        (["--resume", "auto", "--load-from", str(foreign)], "drop --load-from"),
        (["--max-iters", "5", "--epochs", "2"], "drop --epochs"),
        (["--keep-last", "0"], "keep_last"),
    ]
    for argv, message in cases:
        status, out = run_status(train_module, capsys, *MICRO, *work, *argv)
        lines = [line for line in out.err.splitlines() if line.strip()]
        assert status == 1, argv
        assert lines[-1].startswith("error: ") and message in lines[-1], (argv, out.err)
        assert "Traceback" not in out.err
    monkeypatch.setenv("DBNETPP_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        train_module.run([*MICRO, *work, "--data", str(tmp_path / "nowhere")])


class SigtermAt:
    """Wraps the loss: sends this process SIGTERM during call number ``at`` (0-based)."""

    def __init__(self, base, at):
        self.base, self.at, self.calls = base, at, 0

    def __call__(self):
        outer = self

        class Loss(self.base):
            def forward(self, outputs, targets):
                if outer.calls == outer.at:
                    os.kill(os.getpid(), signal.SIGTERM)
                outer.calls += 1
                return super().forward(outputs, targets)

        return Loss()


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_auto_equals_straight_run(tmp_path, train_module, monkeypatch, capsys):
    common = [*MICRO, "--epochs", "2", "--eval-interval", "0", "--save-interval", "1", "--keep-last", "1",
              "--save-interval-iters", "3"]  # fmt: skip
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert train_module.run([*common, "--work-dir", str(straight)]) == 0
    assert sorted(p.name for p in straight.glob("*_*.pth")) == ["epoch_2.pth", "iter_15.pth"]  # keep-last 1

    monkeypatch.setattr(train_module, "DBLoss", SigtermAt(train_module.DBLoss, at=10))  # epoch 1, iteration 2
    status, out = run_status(train_module, capsys, *common, "--work-dir", str(cut), "--resume", "auto")
    monkeypatch.undo()
    assert status == 143 and "SIGTERM received" in out.err and "preempted" in out.err
    mid = read_checkpoint(cut / "last.pth")
    assert (mid["epoch"], mid["iter_in_epoch"], mid["global_step"]) == (0, 3, 11)
    assert mid["sampler"] == [{"epoch": 1, "position": 6}]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed again

    status, out = run_status(train_module, capsys, *common, "--work-dir", str(cut), "--resume", "auto")
    assert status == 0 and f"resume auto: continuing from {cut / 'last.pth'}" in out.out
    assert "resumed from" in out.out and "epoch 1, iteration 3, step 11" in out.out
    a, b = read_checkpoint(straight / "last.pth"), read_checkpoint(cut / "last.pth")
    assert max_weight_delta(a, b) <= 1e-6 and a["global_step"] == b["global_step"] == 16
    for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
        for i, s in a["optimizer"]["state"].items():
            if key in s:
                assert (s[key] - b["optimizer"]["state"][i][key]).abs().max() <= 1e-6
    steps = [(r["step"], r["epoch"], r["iter"]) for r in read_jsonl(cut / "log.jsonl") if r["type"] == "train"]
    assert [s for s, _, _ in steps] == list(range(1, 17))  # every step once, none repeated
    resumes = [r for r in read_jsonl(cut / "log.jsonl") if r["type"] == "resume"]
    assert [(r["epoch"], r["iter"], r["step"]) for r in resumes] == [(0, 0, 0), (1, 3, 11)]


@pytest.mark.slow
def test_learning_rates_used_follow_the_schedule_and_a_longer_resume(tmp_path, train_module):
    work = tmp_path / "lr"
    train_module.run([*MICRO, "--epochs", "2", "--eval-interval", "0", "--work-dir", str(work)])
    scale = 2 / 8  # batch 2 in one process, the tiny preset's base batch 8
    cfg = get_config("tiny_dbnet", train={"epochs": 2, "batch_size": 2})
    used = [r["lr"] for r in read_jsonl(work / "log.jsonl") if r["type"] == "train"]  # log-interval 1: every step
    want = [lr * scale for lr in learning_rates(cfg, 8, 16)]
    assert used == pytest.approx(want, rel=1e-12, abs=0) and len(set(used)) == 2

    # issue 14 point 5: continue with a longer schedule: the first resumed step uses the new one
    train_module.run([*MICRO, "--epochs", "4", "--eval-interval", "0", "--work-dir", str(work),
                      "--resume", str(work / "last.pth")])  # fmt: skip
    longer = get_config("tiny_dbnet", train={"epochs": 4, "batch_size": 2})
    records = [r for r in read_jsonl(work / "log.jsonl") if r["type"] == "train"][16:]
    assert records[0]["step"] == 17
    assert records[0]["lr"] == pytest.approx(lr_at_step(longer, 16, 8) * scale, rel=1e-12)
    assert records[0]["lr"] != pytest.approx(lr_at_step(cfg, 16, 8) * scale, rel=1e-6)
    assert [r["lr"] for r in records] == pytest.approx([lr_at_step(longer, s, 8) * scale for s in range(16, 32)])


@pytest.mark.slow
def test_iteration_based_run_checkpoints_rotates_and_resumes_mid_schedule(tmp_path, train_module, monkeypatch):
    common = [*MICRO, "--max-iters", "11", "--save-interval-iters", "4", "--keep-last", "1", "--eval-interval", "0"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert train_module.run([*common, "--work-dir", str(straight)]) == 0
    records = read_jsonl(straight / "log.jsonl")
    steps = [(r["epoch"], r["iter"], r["step"]) for r in records if r["type"] == "train"]
    assert len(steps) == 11 and steps[-1] == (1, 3, 11)  # 8 + 3 steps: one whole epoch and part of the next
    assert not any(r["type"] == "eval" for r in records)  # eval-interval 0: never
    assert sorted(p.name for p in straight.glob("*.pth")) == ["iter_8.pth", "last.pth"]
    last = read_checkpoint(straight / "last.pth")
    assert (last["global_step"], last["epoch"], last["iter_in_epoch"]) == (11, 0, 3)
    cfg = get_config("tiny_dbnet", train={"max_iters": 11, "batch_size": 2})
    used = [r["lr"] for r in records if r["type"] == "train"]
    assert used == pytest.approx([lr * 2 / 8 for lr in learning_rates(cfg, 8, 11)], rel=1e-12)

    monkeypatch.setattr(train_module, "DBLoss", SigtermAt(train_module.DBLoss, at=5))
    assert train_module.run([*common, "--work-dir", str(cut)]) == 143
    monkeypatch.undo()
    assert train_module.run([*common, "--work-dir", str(cut), "--resume", "auto"]) == 0
    assert max_weight_delta(last, read_checkpoint(cut / "last.pth")) <= 1e-6
    # a finished run asked to resume does nothing more
    assert train_module.run([*common, "--work-dir", str(cut), "--resume", "auto"]) == 0
    assert len([r for r in read_jsonl(cut / "log.jsonl") if r["type"] == "train"]) == 11


# --- torchrun drills (2 CPU processes) ------------------------------------------------------

DRILL = [*MICRO, "--epochs", "2", "--eval-interval", "0", "--dist-timeout", "30"]  # 4 steps per epoch


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DBNETPP_DEBUG": ""}


def _torchrun(work, *launcher_args, log=None, script_args=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher_args, str(SCRIPT), *DRILL,
           "--work-dir", str(work), "--resume", "auto", *script_args]  # fmt: skip
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True)


def _workers(launcher_pid):
    """(pid, RANK) of the training processes a torchrun launcher started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid:
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank:
                found.append((int(entry.name), int(rank[0][5:])))
    return sorted(found, key=lambda x: x[1])


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _logged(work, epoch, it):
    def check():
        try:
            return any(r.get("type") == "train" and (r["epoch"], r["iter"]) >= (epoch, it)
                       for r in read_jsonl(work / "log.jsonl"))  # fmt: skip
        except (OSError, ValueError):
            return False

    return check


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("straight") / "w"
    proc = _torchrun(work, "--standalone", "--nproc_per_node", "2")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return read_checkpoint(work / "last.pth")


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout) if proc.stdout else (None, None)
    if out is None:
        proc.wait(timeout)
    return out


@pytest.mark.slow
def test_sigkill_drill_static_rendezvous(tmp_path, straight_run):
    """torchrun's default (static) rendezvous: SIGKILL a worker after epoch 0; the restart joins and resumes."""
    work, log = tmp_path / "w", tmp_path / "out.log"
    proc = _torchrun(work, "--nproc_per_node", "2", "--max-restarts", "2", "--master-port", str(_free_port()),
                     log=log)  # fmt: skip
    _wait_for(lambda: (work / "last.pth").exists(), 120, "epoch 0's checkpoint")
    os.kill(_workers(proc.pid)[1][0], signal.SIGKILL)
    proc.wait(timeout=240)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "resume auto: continuing from" in text and "resumed from" in text and "epoch 1, iteration 0" in text
    assert max_weight_delta(straight_run, read_checkpoint(work / "last.pth")) <= 1e-6


@pytest.mark.slow
def test_sigterm_drill_c10d_rendezvous_resumes_mid_epoch(tmp_path, straight_run):
    work, log = tmp_path / "w", tmp_path / "out.log"
    proc = _torchrun(work, "--standalone", "--nproc_per_node", "2", "--max-restarts", "2", log=log)
    _wait_for(_logged(work, 1, 1), 120, "epoch 1, iteration 1")
    os.kill(_workers(proc.pid)[1][0], signal.SIGTERM)
    proc.wait(timeout=240)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "SIGTERM received" in text and "exiting with status 143" in text
    resumes = [r for r in read_jsonl(work / "log.jsonl") if r["type"] == "resume" and r["from"]]
    assert len(resumes) == 1 and resumes[0]["epoch"] == 1 and 2 <= resumes[0]["iter"] <= 4, resumes
    assert f"epoch 1, iteration {resumes[0]['iter']}" in text
    assert max_weight_delta(straight_run, read_checkpoint(work / "last.pth")) <= 1e-6


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_launchers(work, tmp_path, *extra, script_args=()):
    port = _free_port()
    procs = []
    for node in (0, 1):
        args = ["--nnodes", "2", "--node-rank", str(node), "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "two-nodes", *extra]  # fmt: skip
        procs.append(_torchrun(work, *args, log=tmp_path / f"node{node}.log", script_args=script_args))
    return procs


@pytest.mark.slow
def test_two_launchers_equal_one_launcher_with_two_processes(tmp_path, straight_run):
    work = tmp_path / "w"
    procs = _two_launchers(work, tmp_path)
    for node, proc in enumerate(procs):
        proc.wait(timeout=240)
        assert proc.returncode == 0, (tmp_path / f"node{node}.log").read_text()[-3000:]
    last = read_checkpoint(work / "last.pth")
    assert last["config"]["run"]["world_size"] == 2
    assert max_weight_delta(straight_run, last) <= 1e-6


@pytest.mark.slow
def test_a_dead_rank_ends_every_process_with_a_message_naming_it(tmp_path):
    work = tmp_path / "w"
    procs = _two_launchers(work, tmp_path, "--max-restarts", "0")
    _wait_for(_logged(work, 0, 1), 120, "the first steps")
    workers = {rank: (pid, node) for node, p in enumerate(procs) for pid, rank in _workers(p.pid)}
    victim, victim_node = workers[1]
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    for proc in procs:
        proc.wait(timeout=60)
    assert time.monotonic() - killed < 30 + 15  # the collective timeout, plus the report and exit
    assert all(p.returncode != 0 for p in procs)
    survivor = (tmp_path / f"node{1 - victim_node}.log").read_text()
    assert "error: rank 0 gave up at epoch" in survivor and "rank(s) 1 stopped responding" in survivor, survivor
    for pid, _ in workers.values():
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.slow
def test_a_hung_rank_ends_the_others_after_the_timeout_naming_it(tmp_path):
    work = tmp_path / "w"
    procs = _two_launchers(work, tmp_path, "--max-restarts", "0", script_args=["--dist-timeout", "10"])
    try:
        _wait_for(_logged(work, 0, 1), 120, "the first steps")
        workers = {rank: (pid, node) for node, p in enumerate(procs) for pid, rank in _workers(p.pid)}
        victim, survivor_node = workers[1][0], workers[0][1]
        stopped = time.monotonic()
        os.kill(victim, signal.SIGSTOP)  # alive but silent: a hang
        procs[survivor_node].wait(timeout=60)
        assert time.monotonic() - stopped < 10 + 5 + 10  # timeout, report window, exit
        assert procs[survivor_node].returncode != 0
        text = (tmp_path / f"node{survivor_node}.log").read_text()
        assert "error: rank 0 gave up at epoch" in text and "rank(s) 1 stopped responding" in text, text[-3000:]
    finally:
        for pid, _ in _workers(procs[0].pid) + _workers(procs[1].pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=60)


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_and_a_new_launch_resumes(tmp_path, straight_run):
    """SLURM / Kubernetes preemption: the launcher gets SIGTERM and forwards it; the job is requeued."""
    work, log = tmp_path / "w", tmp_path / "out.log"
    proc = _torchrun(work, "--standalone", "--nproc_per_node", "2", log=log)
    _wait_for(_logged(work, 0, 1), 120, "epoch 0, iteration 1")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    text = log.read_text()
    assert proc.returncode != 0 and text.count("SIGTERM received") == 2, text[-3000:]
    mid = read_checkpoint(work / "last.pth")
    assert mid["epoch"] == -1 and 1 <= mid["iter_in_epoch"] <= 4 and len(mid["sampler"]) == 2
    again = _torchrun(work, "--standalone", "--nproc_per_node", "2", log=tmp_path / "again.log")
    again.wait(timeout=240)
    text = (tmp_path / "again.log").read_text()
    assert again.returncode == 0 and f"epoch 0, iteration {mid['iter_in_epoch']}" in text, text[-3000:]
    assert max_weight_delta(straight_run, read_checkpoint(work / "last.pth")) <= 1e-6

"""Process-group set-up and the few collectives the training loop needs.

Distributed mode is on iff torchrun's environment is present (``RANK`` and
``WORLD_SIZE``); NCCL is used on CUDA, Gloo on the CPU. Every helper also works in a
plain single process, where it degrades to the obvious no-op.

Restarts. torchrun's agent keeps one TCPStore for the whole job (static rendezvous, and
c10d with its default shared store) and its workers join it without a per-attempt key
prefix. After a restart the new workers therefore find the previous round's keys
(Gloo's and NCCL's peer addresses, the process group's barrier counters): a rank reads
a dead peer's address before the live peer has overwritten it and Gloo fails with
"connectFullMesh failed ... Connection refused" (NCCL would wait on a stale unique id).
``init_distributed`` builds the process group on a key prefix that is fresh for every
round: rank 0 draws a random round id and hands it to each other rank in answer to a
random nonce that rank posted (``_agree_on_round``), so no rank can pick up a stale
value, whatever the rendezvous backend, the restart counts of the nodes' agents, or
the communication backend.

Failures. Collectives time out after ``timeout_s`` (Gloo raises, NCCL aborts); the
``StepWatchdog`` also ends a rank whose training step makes no progress for that long.
Either way ``report_failure`` names the ranks that stopped answering and the step.
"""

import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, rank on this node, its device."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or is_dist_avail_and_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


DEFAULT_TIMEOUT_S = 600.0  # collective timeout; a checkpoint write or evaluation must fit in it
_KEY = "dbnetpp"
_round_store: Optional[Any] = None  # this round's prefixed store (failure reports use it)


def init_distributed(device: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join torchrun's process group if there is one and pick this process's device.

    ``device`` is "cpu", "cuda" or "cuda:K" (K is ignored under torchrun: each
    process takes ``cuda:LOCAL_RANK``); None means CUDA when available. Collectives
    (and the set-up itself) give up after ``timeout_s`` seconds. Safe under torchrun
    restarts (see the module docstring).
    """
    global _round_store
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, 1, dev)

    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not is_dist_avail_and_initialized():
        timeout = timedelta(seconds=timeout_s)
        # torchrun's (or rank 0's) TCPStore at MASTER_ADDR:MASTER_PORT, as init_method="env://" would use it
        base, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
        round_id = _agree_on_round(base, rank, world_size, timeout_s)
        _round_store = dist.PrefixStore(f"{_KEY}/round/{round_id}/", base)
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore("pg/", _round_store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            **kwargs,
        )
    return DistInfo(rank, world_size, local_rank, local_world_size, dev)


def _has_key(store: Any, key: str) -> bool:
    """Whether ``store`` holds ``key``, without waiting. ``Store.check`` is missing on some stores
    of older torch (HashStore in 2.1): there a 1 ms ``wait`` answers the same question."""
    check = getattr(store, "check", None)
    if check is not None:
        return bool(check([key]))
    try:
        store.wait([key], timedelta(milliseconds=1))
    except RuntimeError:  # timed out: not there (DistStoreError subclasses RuntimeError)
        return False
    return True


def _agree_on_round(store: Any, rank: int, world_size: int, timeout_s: float) -> str:
    """A random id shared by every rank of this round, never one of an earlier round.

    Each rank r > 0 posts a fresh nonce under ``hello/r`` and waits for ``answer/<nonce>``;
    rank 0 answers every nonce it sees there (a dead process's stale one is answered too,
    harmlessly) until each rank has acknowledged under ``ack/<round id>/r``.
    """
    if world_size == 1:
        return uuid.uuid4().hex
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"{_KEY}/hello/{rank}", nonce)
        round_id = store.get(f"{_KEY}/answer/{nonce}").decode()  # blocks up to the store timeout
        store.set(f"{_KEY}/ack/{round_id}/{rank}", "1")
        return round_id
    round_id = uuid.uuid4().hex
    answered: Dict[int, str] = {}
    pending = set(range(1, world_size))
    deadline = time.monotonic() + timeout_s
    while pending:
        for r in sorted(pending):
            if _has_key(store, f"{_KEY}/ack/{round_id}/{r}"):
                pending.discard(r)
            elif _has_key(store, f"{_KEY}/hello/{r}"):
                nonce = store.get(f"{_KEY}/hello/{r}").decode()
                if answered.get(r) != nonce:
                    store.set(f"{_KEY}/answer/{nonce}", round_id)
                    answered[r] = nonce
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"rank(s) {sorted(pending)} did not join the process group within {timeout_s:g} s")
        if pending:
            time.sleep(0.01)
    return round_id


def report_failure(rank: int, where: str, cause: str = "", wait_s: float = 5.0) -> str:
    """After a failed or timed-out collective: a one-line message naming the ranks that stopped.

    Every surviving rank posts ``where`` (e.g. "epoch 3, iteration 7 (step 52)") to this
    round's store and waits up to ``wait_s`` seconds for the others; the ranks that never
    post are the ones that died or hang. Without a reachable store (rank 0's node hosts
    it), the message says so.
    """
    world_size = get_world_size() if is_dist_avail_and_initialized() else 1
    head = f"rank {rank} gave up at {where}" + (f" ({cause})" if cause else "")
    store = _round_store
    if store is None or world_size < 2:
        return head
    try:
        store.set_timeout(timedelta(seconds=wait_s))
        store.set(f"failed/{rank}", where)
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(world_size) if not _has_key(store, f"failed/{r}")]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    except Exception:  # the store went away with its host
        return f"{head}: the rendezvous store is unreachable, so rank 0's node is gone (rank 0 died or hangs)"
    if not missing:
        return f"{head}: every rank reported the failure"
    names = ", ".join(str(r) for r in missing)
    return f"{head}: rank(s) {names} stopped responding (died or hang) and never reached it"


class StepWatchdog:
    """Ends this process when a training step makes no progress for ``timeout_s`` seconds.

    ``arm(where)`` before a step, ``disarm()`` after it. On expiry a daemon thread prints
    ``error: <report_failure message>`` and exits with status 1 (a blocked NCCL or Gloo
    call cannot be interrupted otherwise). Inactive in a single process.
    """

    def __init__(self, rank: int, timeout_s: float, enabled: bool = True) -> None:
        self.rank = rank
        self.timeout_s = timeout_s
        self.where = "start-up"
        self._deadline: Optional[float] = None
        self._lock = threading.Lock()
        if enabled:
            threading.Thread(target=self._watch, name="dbnetpp-step-watchdog", daemon=True).start()

    def arm(self, where: str) -> None:
        with self._lock:
            self.where = where
            self._deadline = time.monotonic() + self.timeout_s

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            with self._lock:
                expired = self._deadline is not None and time.monotonic() > self._deadline
                where = self.where
            if expired:
                message = report_failure(self.rank, where, f"no progress for {self.timeout_s:g} s")
                print(f"error: {message}", file=sys.stderr, flush=True)
                os._exit(1)


def cleanup() -> None:
    """Leave the process group (if any)."""
    global _round_store
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()
    _round_store = None


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not is_dist_avail_and_initialized():
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_dist_avail_and_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank iff ``flag`` is true on at least one (one small all-reduce)."""
    if not is_dist_avail_and_initialized() or get_world_size() < 2:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_dict(values: Dict[str, torch.Tensor], average: bool = True) -> Dict[str, torch.Tensor]:
    """All-reduce a dict of scalar tensors (one collective), mean over ranks by default.

    Keys are sorted so every rank stacks the values in the same order.
    """
    world_size = get_world_size()
    if world_size < 2:
        return values
    with torch.no_grad():
        names = sorted(values)
        stacked = torch.stack([values[k].detach().float() for k in names])
        dist.all_reduce(stacked)
        if average:
            stacked /= world_size
        return dict(zip(names, stacked))

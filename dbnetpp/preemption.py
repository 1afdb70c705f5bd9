"""SIGTERM as a request to stop after the current iteration (cluster preemption).

SLURM and Kubernetes announce a preemption with SIGTERM and follow with SIGKILL after a
grace period; torchrun forwards its SIGTERM to the workers. ``PreemptionHandler`` turns
the signal into a flag that the training loop polls after each optimiser step (all ranks
agree through one all-reduce, so they stop at the same step); the loop then writes a
mid-epoch checkpoint and raises ``Preempted``, and ``examples/train.py`` exits with
``PREEMPTED_EXIT_STATUS``. Any non-zero status makes torchrun restart the workers
(``--max-restarts``); with ``--resume auto`` they continue at the next batch.
"""

import signal
import sys
from typing import Any, Dict, Optional, Sequence

__all__ = ["PREEMPTED_EXIT_STATUS", "Preempted", "PreemptionHandler"]

PREEMPTED_EXIT_STATUS = 143  # 128 + SIGTERM: "terminated", which restarts the job everywhere


class Preempted(Exception):
    """Training stopped on request after writing ``checkpoint`` (a path, or None on ranks > 0)."""

    def __init__(self, checkpoint: Optional[str], where: str) -> None:
        self.checkpoint = checkpoint
        self.where = where
        super().__init__(f"stopped on SIGTERM at {where}" + (f"; checkpoint {checkpoint}" if checkpoint else ""))


class PreemptionHandler:
    """Records SIGTERM (and any of ``signals``) instead of dying; ``requested`` says if one came."""

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,), rank: int = 0) -> None:
        self.signals = tuple(signals)
        self.rank = rank
        self.requested = False
        self._previous: Dict[int, Any] = {}

    def install(self) -> "PreemptionHandler":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.requested:
            name = signal.Signals(signum).name
            print(f"rank {self.rank}: {name} received, stopping after this iteration", file=sys.stderr, flush=True)
        self.requested = True

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.restore()

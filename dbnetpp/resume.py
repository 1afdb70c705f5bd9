"""Which checkpoint a run continues from, and where in the schedule it continues.

``--resume auto`` makes the same command line serve the first start and every restart:
``find_resume_checkpoint`` returns the newest complete training checkpoint of the work
directory (writes are atomic, so every ``*.pth`` there is complete), or None for a fresh
start. When the newest one cannot be read (disk damage, a foreign file) it refuses, naming
it: the run would otherwise start over or from an older file and overwrite it. ``resume_position`` turns a
checkpoint into (epoch, iteration within it, optimiser steps done), for end-of-epoch
checkpoints, mid-epoch ones (preemption, ``iter_N.pth``) and those written before the
step count was recorded.
"""

import re
import warnings
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple, Union

from .checkpoint import CheckpointError, read_checkpoint

__all__ = ["TRAINING_KEYS", "find_resume_checkpoint", "check_training_checkpoint", "resume_position"]

TRAINING_KEYS = ("model", "model_name", "optimizer", "epoch")
_PERIODIC = re.compile(r"^(epoch|iter)_(\d+)\.pth$")


def _candidates(work_dir: Path) -> List[Path]:
    files = [p for p in work_dir.glob("*.pth") if p.name == "last.pth" or _PERIODIC.match(p.name)]
    # newest first; last.pth wins ties (every save writes it together with the periodic file)
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.pth"), reverse=True)


def find_resume_checkpoint(work_dir: Union[str, Path]) -> Optional[Path]:
    """The newest training checkpoint (last.pth, iter_N.pth, epoch_N.pth), or None when there is none.

    Raises CheckpointError naming the newest one when it cannot be read or is not a training
    checkpoint: it is left untouched (move it away to continue from the one before).
    """
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return None
    for path in _candidates(work_dir):
        try:
            check_training_checkpoint(read_checkpoint(path), path)
        except FileNotFoundError:  # deleted since it was listed (rotation by another process)
            continue
        except (OSError, CheckpointError) as e:
            raise CheckpointError(
                f"--resume auto: the newest checkpoint in {work_dir} cannot be resumed: {e}. It is left as it "
                f"is; move it out of {work_dir} to resume from the one before, or give --resume PATH"
            ) from None
        return path
    return None


def check_training_checkpoint(
    ckpt: Mapping[str, Any], source: Union[str, Path], model_name: Optional[str] = None
) -> None:
    """Raise CheckpointError unless ``ckpt`` is a dbnetpp training checkpoint (of the model
    ``model_name``, when given: the message names the file and both models)."""
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{source} is not a dbnetpp training checkpoint (no {', '.join(missing)}); "
            "to start from its weights use --load-from"
        )
    stored = ckpt["model_name"]
    if model_name is not None and stored != model_name:
        from .models.dbnet import same_architecture

        if not same_architecture(model_name, stored):
            raise CheckpointError(
                f"{source} holds a {stored!r} model, but this run builds {model_name!r}: resume with "
                f"--model {stored} (or the --preset it was trained with)"
            )


def resume_position(ckpt: Mapping[str, Any], iters_per_epoch: int, rank: int, world_size: int) -> Tuple[int, int, int]:
    """(epoch to run next, batches of it already done, optimiser steps done) after ``ckpt``.

    ``ckpt["epoch"]`` is the last finished epoch; a mid-epoch checkpoint adds
    ``iter_in_epoch`` and each rank's sampler position (``sampler``). When the number of
    ranks changed, a half-done epoch restarts from its beginning (with a warning).
    """
    epoch = int(ckpt["epoch"]) + 1
    iter_in_epoch = int(ckpt.get("iter_in_epoch", 0))
    step = int(ckpt.get("global_step", epoch * iters_per_epoch + iter_in_epoch))
    if iter_in_epoch == 0:
        return epoch, 0, step
    samplers = ckpt.get("sampler") or []
    if len(samplers) != world_size:
        warnings.warn(
            f"the checkpoint was written by {len(samplers)} processes, this run has {world_size}: "
            f"epoch {epoch} restarts from its first batch"
        )
        return epoch, 0, step - iter_in_epoch
    state = samplers[rank]
    if int(state["epoch"]) != epoch:
        raise CheckpointError(f"sampler state is for epoch {state['epoch']}, the checkpoint resumes epoch {epoch}")
    return epoch, iter_in_epoch, step

"""A training sampler that can start an epoch part-way through (exact mid-epoch resume).

``ResumableSampler`` orders an epoch exactly as ``torch.utils.data.DistributedSampler``
does (a permutation from ``seed + epoch``, padded by repeating its start to a multiple of
the number of ranks, rank r taking positions r, r + W, ...), in one process too, and
``set_epoch(epoch, start=k)`` makes it skip the first k samples of this rank's share, so
a run resumed after k samples sees the rest of the same epoch in the same order.
"""

import math
from typing import Dict, Iterator, List

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Indices of rank ``rank``'s share of each epoch over ``dataset_len`` samples.

    Args:
        dataset_len: number of samples (>= 1).
        num_replicas: number of ranks sharing the epoch.
        rank: this rank, 0 <= rank < num_replicas.
        shuffle: permute each epoch (else ``range(dataset_len)``).
        seed: base seed; epoch e uses ``seed + e``, identically on every rank.
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        if dataset_len < 1:
            raise ValueError(f"dataset_len must be >= 1, got {dataset_len}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_samples = math.ceil(dataset_len / num_replicas)  # per rank and epoch
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip this rank's first ``start`` samples of it."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}")
        self.epoch = int(epoch)
        self.start = int(start)

    def epoch_indices(self) -> List[int]:
        """This rank's whole share of the current epoch, skipped samples included."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        total = self.num_samples * self.num_replicas
        while len(order) < total:  # pad with the epoch's first samples, as DistributedSampler does
            order += order[: total - len(order)]
        return order[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start

    def state(self, consumed: int) -> Dict[str, int]:
        """Where this rank stands after ``consumed`` more samples of the current epoch."""
        return {"epoch": self.epoch, "position": self.start + int(consumed)}

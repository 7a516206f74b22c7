"""A resumable training order for map-style datasets: epoch-seeded shuffle, split by rank, resumable mid-epoch.

`ResumableSampler` yields `SeededIndex` values: ints that also carry the seed of their sample's random augmentation
(crop, flip, mask), drawn from (seed, epoch, position). A dataset that draws its randomness from that seed
(`ldm.data.transforms.call_rng`) gives the same sample for the same position in the same epoch whatever the worker,
the number of workers, the process or a restart in between; no dataset randomness comes from global RNG state.
"""
from typing import Iterator, Sized

import numpy as np
from torch.utils.data import DistributedSampler


class SeededIndex(int):
    """A dataset index with `salt`, the seed of that sample's random augmentation."""

    salt: int

    def __new__(cls, index: int, salt: int) -> "SeededIndex":
        obj = super().__new__(cls, index)
        obj.salt = int(salt)
        return obj

    def __reduce__(self):  # DataLoader workers receive indices pickled
        return SeededIndex, (int(self), self.salt)

    def __repr__(self) -> str:
        return f"SeededIndex({int(self)}, salt={self.salt})"


def epoch_order(length: int, seed: int, epoch: int, shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(indices, salts) of one epoch: a permutation of range(length) (identity without shuffle) and one
    augmentation seed per position, both a pure function of (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    indices = rng.permutation(length) if shuffle else np.arange(length)
    salts = rng.integers(0, 2 ** 62, size=length, dtype=np.int64)
    return indices, salts


class ResumableSampler(DistributedSampler):
    """Epoch-seeded order of `dataset`, this rank's share of it, resumable mid-epoch.

    Each epoch is `epoch_order(len(dataset), seed, epoch)`, padded by repetition to a multiple of
    `num_replicas`; rank r takes positions r, r + num_replicas, ... (as DistributedSampler, which it
    subclasses so that Lightning keeps it under DDP instead of replacing it). Lightning calls `set_epoch` at
    every epoch start. `resume(epoch, consumed)` makes the next pass over `epoch` skip its first `consumed`
    indices (this rank's), so a run restarted from a mid-epoch checkpoint sees exactly the rest of that epoch.
    `len()` stays the full epoch so the trainer's batch counting is unchanged.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"ResumableSampler: rank {rank} outside [0, {num_replicas})")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, consumed: int) -> None:
        """Skip the first `consumed` indices of this rank's share of `epoch` the next time it is iterated."""
        if consumed < 0:
            raise ValueError(f"ResumableSampler.resume: consumed must be >= 0, got {consumed}")
        self._resume = (epoch, consumed) if consumed else None

    def __iter__(self) -> Iterator[SeededIndex]:
        indices, salts = epoch_order(len(self.dataset), self.seed, self.epoch, self.shuffle)
        positions = np.arange(self.total_size) % len(indices)      # padding repeats the epoch's start
        mine = positions[self.rank:self.total_size:self.num_replicas]
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = min(self._resume[1], len(mine))
        self._resume = None
        for p in mine[start:]:
            yield SeededIndex(int(indices[p]), int(salts[p]))

"""LRUMemo: a bounded memo of per-item results of a batched computation (frozen encoders' outputs).

Shared by FrozenTextEmbedder's caption cache (keys: captions) and LatentDiffusion's first-stage cache
(keys: image digests). A batch's keys are looked up; the items whose keys are new (first occurrence in the
batch) are computed in one batched call; the least recently used entries go first beyond `size`.
"""
from collections import OrderedDict
from typing import Callable, Hashable, Iterable, Iterator, Sequence

import torch


class LRUMemo:
    """key -> row tensor, at most `size` entries (least recently used evicted first); counts hits and misses."""

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"LRUMemo: size must be >= 0, got {size}")
        self.size = size
        self._rows: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[Hashable]:
        """Keys, least recently used first."""
        return iter(self._rows)

    def clear(self) -> None:
        self._rows.clear()

    def rows(self, keys: Sequence[Hashable], compute: Callable[[list[int]], Iterable[torch.Tensor]]
             ) -> list[torch.Tensor]:
        """One row per key; `compute(indices)` gets the batch indices of the first occurrence of each key not
        yet held and returns their rows in that order."""
        first: dict[Hashable, int] = {}                                   # new key -> its first batch index
        for i, key in enumerate(keys):
            if key not in self._rows and key not in first:
                first[key] = i
        if first:
            for key, row in zip(first, compute(list(first.values()))):
                self._rows[key] = row.detach()
        self.hits += len(keys) - len(first)
        self.misses += len(first)
        for key in dict.fromkeys(keys):
            self._rows.move_to_end(key)
        out = [self._rows[key] for key in keys]
        while len(self._rows) > self.size:
            self._rows.popitem(last=False)
        return out

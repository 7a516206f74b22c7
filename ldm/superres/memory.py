"""Pick a tile size from a memory budget (`--max-memory 4GB`), using measured peak memory.

The peak memory of one call of a network on a tile of p = side^2 pixels is modelled as

    bytes(p) = c0 + c1 p + c2 p^2,     c0, c1, c2 >= 0 (non-negative least squares)

c1 covers activations (convolutions, linear attention), c2 quadratic self-attention scores. The
coefficients are fitted to peaks measured at a few small sides (`measure_memory_model`): on CUDA,
torch.cuda.max_memory_allocated above the memory allocated before the call; on CPU, the bytes of
tensors alive at once as seen by a dispatch-mode counter (kernel scratch buffers invisible to it
are not counted). `pick_tile_size` then returns the largest side, a multiple of `multiple`, whose
predicted peak plus `reserved` bytes (weights and other resident tensors) fits the budget.

Measured CPU peaks are deterministic; CUDA peaks depend on the kernels chosen (cuDNN benchmark,
SDPA backend), so measure with the settings used for sampling.
"""
import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """"4GB" -> 4 * 10^9, "4GiB" -> 4 * 2^30, "512MB", "1.5G", 4e9 -> bytes (SI for GB, binary for GiB)."""
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read the memory size {text!r}; write e.g. 4GB, 4GiB, 512MB or 4e9")
        value, unit = float(match.group(1)), match.group(2).lower()
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return int(value * _UNITS[unit])


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created by aten ops while active, and their peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}      # storage pointer -> [tensors referring to it, bytes]
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.live:
                self.live[key][0] += 1
            elif key in inputs:               # a view or in-place result of memory allocated before
                continue
            else:
                self.live[key] = [1, storage.nbytes()]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, key)
        return out


def measure_peak_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated while `fn()` runs, above what was allocated before (its output released)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    with LiveTensorBytes() as counter:
        fn()
    return int(counter.peak)


@dataclass(frozen=True)
class MemoryModel:
    """Peak bytes of one call as c0 + c1 p + c2 p^2 in the pixels p of the input tile."""
    c0: float
    c1: float
    c2: float = 0.0

    def predict(self, side: int | tuple[int, int]) -> float:
        h, w = (side, side) if isinstance(side, int) else side
        p = float(h * w)
        return self.c0 + self.c1 * p + self.c2 * p * p

    @classmethod
    def fit(cls, sides: Sequence[int], peaks: Sequence[float], degree: int = 2) -> "MemoryModel":
        """Non-negative least squares on (side^2, peak) points; degree 1 drops the quadratic term."""
        from scipy.optimize import nnls  # scipy comes with scikit-image

        if degree not in (1, 2) or len(sides) < degree + 1:
            raise ValueError(f"MemoryModel.fit: need degree 1 or 2 and at least degree + 1 points, "
                             f"got degree {degree} with {len(sides)} points")
        p = np.asarray(sides, dtype=np.float64) ** 2
        scale = float(max(peaks)) or 1.0                # a well-conditioned system: columns of similar size
        columns = [np.ones_like(p), p / p.max(), (p / p.max()) ** 2][:degree + 1]
        coef, _ = nnls(np.stack(columns, axis=1), np.asarray(peaks, dtype=np.float64) / scale)
        coef = [float(c) for c in coef * scale] + [0.0] * (2 - degree)
        return cls(coef[0], coef[1] / float(p.max()), coef[2] / float(p.max()) ** 2)


def measure_memory_model(fn: Callable[[torch.Tensor], Any], make_input: Callable[[int], torch.Tensor],
                         sides: Sequence[int] = (16, 24, 32, 48), device: torch.device | str = "cpu",
                         degree: int = 2) -> tuple[MemoryModel, list[int]]:
    """Fit a MemoryModel to the peaks of fn(make_input(side)) at each side; returns (model, measured peaks).
    The input is made before measuring, so only what `fn` allocates counts."""
    peaks = []
    with torch.no_grad():
        for side in sides:
            x = make_input(side)
            peaks.append(measure_peak_bytes(lambda: fn(x), device))
            del x
    return MemoryModel.fit(sides, peaks, degree), peaks


def pick_tile_size(max_bytes: int | str, model: MemoryModel, reserved: int = 0, multiple: int = 8,
                   min_tile: int = 8, max_tile: int = 4096) -> int:
    """The largest side in [min_tile, max_tile], a multiple of `multiple`, with model.predict(side) + reserved
    <= max_bytes; a clear error when even min_tile does not fit."""
    budget = parse_bytes(max_bytes) - reserved
    sides = range(max_tile - max_tile % multiple, min_tile - 1, -multiple)
    for side in sides:
        if model.predict(side) <= budget:
            return side
    raise ValueError(f"memory budget {parse_bytes(max_bytes) / 2**30:.2f} GiB (after {reserved / 2**30:.2f} GiB "
                     f"reserved) is below the predicted {model.predict(min_tile) / 2**30:.2f} GiB of the smallest "
                     f"tile ({min_tile}); raise --max-memory")


def tile_size_for_budget(fn: Callable[[torch.Tensor], Any], make_input: Callable[[int], torch.Tensor],
                         max_bytes: int | str, sides: Sequence[int] = (16, 24, 32, 48),
                         device: torch.device | str = "cpu", reserved: int | None = None, multiple: int = 8,
                         min_tile: int = 8, max_tile: int = 4096, degree: int = 2) -> tuple[int, MemoryModel]:
    """measure_memory_model then pick_tile_size: (tile side, model). `reserved` defaults to what is allocated on
    a CUDA device now (weights, resident tensors) and 0 on CPU."""
    model, _ = measure_memory_model(fn, make_input, sides, device, degree)
    if reserved is None:
        reserved = torch.cuda.memory_allocated(device) if torch.device(device).type == "cuda" else 0
    return pick_tile_size(max_bytes, model, reserved, multiple, min_tile, max_tile), model

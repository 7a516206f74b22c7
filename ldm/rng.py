"""The process' random number generators as checkpointable state: torch (CPU and CUDA), numpy, Python's random.

States are plain tensors and numbers, so checkpoints that hold them still load with weights_only=True.
"""
import contextlib
import random
from typing import Any, Iterator

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Every global generator's state; CUDA: the current device's, once CUDA is initialised (asking for every
    device's would start a CUDA context on each GPU in every DDP process)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (the CUDA state to the current device, when there is one)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(w) for w in p["words"].tolist()), p["gauss_next"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def same_rng_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two `rng_state` results are equal (CPU generators)."""
    return (torch.equal(a["torch"], b["torch"]) and torch.equal(a["numpy"]["keys"], b["numpy"]["keys"])
            and a["numpy"]["pos"] == b["numpy"]["pos"] and torch.equal(a["python"]["words"], b["python"]["words"]))


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Random draws inside the block leave every global generator as it was (logging, validation)."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)

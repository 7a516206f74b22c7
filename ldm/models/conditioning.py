"""Conditioning dropout for classifier-free guidance (Ho & Salimans 2022) and the null condition of each kind.

Conditions travel as a dict keyed by the DiffusionWrapper keywords `c_concat`, `c_crossattn`, `c_adm`.
A dropped cross-attention / adm condition is the conditioner's `null_condition` (null class, empty caption,
empty layout) encoded like any other; a dropped concat condition is all zeros.
"""
from typing import Any, Mapping, Sequence

import torch

from ldm.util import ConfigError

# conditioning kinds as users name them (conditioning_key vocabulary) -> DiffusionWrapper keyword
KIND_KEYWORDS = {"concat": "c_concat", "crossattn": "c_crossattn", "adm": "c_adm"}


def drop_probabilities(cond_drop_prob: float | Mapping[str, float], keywords: Sequence[str]) -> dict[str, float]:
    """`cond_drop_prob` -> {keyword: p} for the model's condition keywords (e.g. ["c_crossattn"]).

    One number applies to every kind; a mapping {concat|crossattn|adm: p} sets kinds one by one (others 0).
    """
    if isinstance(cond_drop_prob, Mapping):
        unknown = [k for k in cond_drop_prob if KIND_KEYWORDS.get(k) not in keywords]
        if unknown:
            have = [k for k, v in KIND_KEYWORDS.items() if v in keywords]
            raise ConfigError(f"model.params.cond_drop_prob: {unknown} name no condition of this model; "
                              f"its conditions are {have}")
        probs = {KIND_KEYWORDS[k]: float(p) for k, p in cond_drop_prob.items()}
    else:
        probs = {kw: float(cond_drop_prob) for kw in keywords}
    bad = {k: p for k, p in probs.items() if not 0.0 <= p <= 1.0}
    if bad:
        raise ConfigError(f"model.params.cond_drop_prob must lie in [0, 1], got {bad}")
    return {kw: probs.get(kw, 0.0) for kw in keywords}


def drop_mask(batch_size: int, p: float, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool (B,): True for the samples whose condition is replaced by the null one (each with probability p)."""
    draw_device = generator.device if generator is not None else device
    u = torch.rand(batch_size, generator=generator, device=draw_device)
    return (u < p).to(device)


def replace_where(drop: torch.Tensor, cond: Any, null: Any) -> Any:
    """`cond` with the samples where `drop` is True taken from `null` (tensors of one shape, or lists of str)."""
    if isinstance(cond, torch.Tensor):
        if not isinstance(null, torch.Tensor) or null.shape != cond.shape:
            got = tuple(null.shape) if isinstance(null, torch.Tensor) else type(null).__name__
            raise ValueError(f"conditioning dropout: the null condition {got} does not match the condition "
                             f"{tuple(cond.shape)} (e.g. the conditioner's max_objects differs from the data's)")
        mask = drop.to(cond.device).view(-1, *([1] * (cond.ndim - 1)))
        return torch.where(mask, null.to(cond.device, cond.dtype), cond)
    if isinstance(cond, (list, tuple)) and len(cond) == len(drop) and len(null) == len(drop):
        return [n if d else c for c, n, d in zip(cond, null, drop.tolist())]
    raise TypeError(f"conditioning dropout: cannot replace a {type(cond).__name__} condition of length "
                    f"{len(cond) if hasattr(cond, '__len__') else '?'} for a batch of {len(drop)}")


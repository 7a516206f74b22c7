"""Classifier-free guidance as a denoiser wrapper: out = out_u + scale * (out_c - out_u), one batched call.

Guidance is applied to the raw model output, whatever its parameterisation. For a fixed (x_t, t) the
maps between eps, x0 and v are affine (x0 = (x_t - b eps) / a, v = a eps - b x0), and an affine map
commutes with the combination (1 - s) out_u + s out_c because its weights sum to one. Guiding v or x0
outputs is therefore exactly the same as guiding the eps they imply.
"""
from typing import Any, Callable, Mapping

import torch
from torch import Tensor


class CFGDenoiser:
    """Wrap `model(x, t, **cond)` into a guided denoiser with the same signature.

    `uncond` holds the null conditions under the same keyword names as the `cond` passed per call
    (tensors, {"c_concat": [...], "c_crossattn": [...]} dicts, lists); a tensor with batch 1 is expanded
    to the conditional batch. scale 1 calls only the conditional model, scale 0 only the unconditional.
    """

    def __init__(self, model: Callable[..., Tensor], scale: float, uncond: Mapping[str, Any]):
        if not isinstance(uncond, Mapping):
            raise TypeError(f"CFGDenoiser: uncond must be a dict of keyword conditions, got {type(uncond).__name__}")
        self.model, self.scale, self.uncond = model, float(scale), dict(uncond)

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        if self.scale == 1.0:
            return self.model(x, t, **cond)
        if self.scale == 0.0:
            return self.model(x, t, **self.uncond)
        both = concat_conditions(self.uncond, cond, "cond")
        out_u, out_c = self.model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)  # (B, ...) each
        return out_u + self.scale * (out_c - out_u)


def concat_conditions(uncond: Any, cond: Any, where: str) -> Any:
    """Stack unconditional before conditional along the batch, recursing into dicts, lists and tuples."""
    if isinstance(cond, Tensor):
        if not isinstance(uncond, Tensor):
            raise TypeError(f"CFGDenoiser: {where} is a tensor but uncond {where} is {type(uncond).__name__}")
        if uncond.shape[0] == 1 and cond.shape[0] != 1:
            uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
        if uncond.shape != cond.shape:
            raise ValueError(f"CFGDenoiser: uncond {where} has shape {tuple(uncond.shape)}, "
                             f"cond {where} has {tuple(cond.shape)}")
        return torch.cat([uncond, cond])
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping) or set(uncond) != set(cond):
            got = sorted(uncond) if isinstance(uncond, Mapping) else type(uncond).__name__
            raise ValueError(f"CFGDenoiser: {where} keys {sorted(cond)} differ from uncond's {got}")
        return {k: concat_conditions(uncond[k], cond[k], f"{where}[{k!r}]") for k in cond}
    if isinstance(cond, (list, tuple)):
        if not isinstance(uncond, (list, tuple)) or len(uncond) != len(cond):
            raise ValueError(f"CFGDenoiser: {where} is a sequence of {len(cond)}; uncond's does not match")
        return type(cond)(concat_conditions(u, c, f"{where}[{i}]") for i, (u, c) in enumerate(zip(uncond, cond)))
    if uncond != cond:
        raise ValueError(f"CFGDenoiser: non-tensor {where} differs between cond ({cond!r}) and uncond ({uncond!r})")
    return cond

"""Plumbing shared by the sigma samplers: the denoiser call at one noise level, the ancestral split of a step,
input checks. The samplers work on x = x0 + sigma eps and take descending `sigmas` (usually ending with 0)."""
import math
from typing import Any, Callable, Mapping, Optional, Tuple

import torch
from torch import Tensor

SigmaCallback = Callable[[int, Tensor, Tensor], None]  # callback(i, x, denoised) after step i


def check_sigmas(sigmas: Tensor, x: Tensor) -> list:
    """sigmas as a list of Python floats (double precision); an error unless descending, >= 0, two or more."""
    values = [float(s) for s in torch.as_tensor(sigmas).detach().cpu().to(torch.float64)]
    if len(values) < 2:
        raise ValueError(f"sigma sampler: need at least two sigmas (start and end), got {len(values)}")
    if any(b >= a for a, b in zip(values, values[1:])) or values[-1] < 0:
        raise ValueError(f"sigma sampler: sigmas must be strictly descending and >= 0, got {values[:4]}...")
    if not torch.is_floating_point(x):
        raise ValueError(f"sigma sampler: x must be a float tensor, got {x.dtype}")
    return values


def denoised_at(denoiser: Callable[..., Tensor], x: Tensor, sigma: float,
                extra_args: Optional[Mapping[str, Any]]) -> Tensor:
    """D(x, sigma) with sigma as a [B] tensor on x's device and dtype."""
    return denoiser(x, x.new_full((x.shape[0],), sigma), **(extra_args or {}))


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> Tuple[float, float]:
    """(sigma_down, sigma_up): a deterministic step to sigma_down, then fresh noise of std sigma_up, so that the
    noise level lands on sigma_next (sigma_down^2 + sigma_up^2 = sigma_next^2); eta = 1 is the DDPM posterior."""
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - up ** 2), up


def check_eta(eta: float, name: str) -> None:
    if eta < 0:
        raise ValueError(f"{name}: eta must be >= 0, got {eta}")

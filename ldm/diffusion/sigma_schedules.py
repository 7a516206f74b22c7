"""Noise levels for the sigma samplers: descending sigmas [n + 1], the last one 0 (the sample itself).

  uniform      the discrete model's own spacing: timesteps evenly spaced from t_max down to 0, each mapped to
               its sigma by interpolating log sigma over the grid (k-diffusion's `get_sigmas`; diffusers'
               "linspace" spacing, which interpolates sigma linearly, gives the same sigmas at integer t)
  karras       (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, rho = 7
               (Karras et al. 2022, eq. 5)
  exponential  evenly spaced in log sigma between sigma_max and sigma_min
sigma_min is the grid's smallest sigma (t = 0); sigma_max that of t_max (default T - 1: the whole range;
img2img starts lower). All float64.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from ldm.diffusion.denoiser import interpolate_log_sigma

SIGMA_SCHEDULES = ("uniform", "karras", "exponential")


def append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """n sigmas from sigma_max to sigma_min, then 0 (Karras et al. 2022, eq. 5)."""
    _check(n, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n sigmas evenly spaced in log sigma from sigma_max to sigma_min, then 0."""
    _check(n, sigma_min, sigma_max)
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def uniform_sigmas(n: int, log_sigmas: Tensor, t_max: Optional[float] = None) -> Tensor:
    """The sigmas of n timesteps evenly spaced from t_max (default T - 1) down to 0, then 0."""
    t_max = len(log_sigmas) - 1 if t_max is None else t_max
    _check(n, 1.0, 1.0)
    return append_zero(interpolate_log_sigma(log_sigmas, torch.linspace(t_max, 0, n, dtype=torch.float64)))


def make_sigmas(name: str, n: int, log_sigmas: Tensor, t_max: Optional[float] = None, rho: float = 7.0) -> Tensor:
    """Schedule `name` over a discrete model's log-sigma grid, from timestep t_max (default the last)."""
    if name not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown sigma schedule {name!r}; choose one of {SIGMA_SCHEDULES}")
    if t_max is not None and not 0 <= t_max <= len(log_sigmas) - 1:
        raise ValueError(f"t_max must be in [0, {len(log_sigmas) - 1}], got {t_max}")
    if name == "uniform":
        return uniform_sigmas(n, log_sigmas, t_max)
    sigma_min = log_sigmas[0].exp().item()
    sigma_max = (interpolate_log_sigma(log_sigmas, torch.tensor(float(t_max))) if t_max is not None
                 else log_sigmas[-1].exp()).item()
    if name == "karras":
        return karras_sigmas(n, sigma_min, sigma_max, rho)
    return exponential_sigmas(n, sigma_min, sigma_max)


def _check(n: int, sigma_min: float, sigma_max: float) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"sigma schedule: the number of steps must be a positive int, got {n!r}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"sigma schedule: need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")

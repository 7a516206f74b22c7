"""The continuous sigma interface over a discrete-time model (Karras et al. 2022; k-diffusion's discrete wrappers).

A discrete model predicts eps, x0 or v from x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) eps at timesteps t of its
training grid. Dividing by sqrt(acp_t) gives the variance-exploding variable x = x0 + sigma eps with
sigma_t = sqrt((1 - acp_t) / acp_t); the sigma samplers integrate in x and call D(x, sigma) ~ E[x0 | x]:

    x_t = c_in x,  c_in = 1 / sqrt(sigma^2 + 1);   out = model(x_t, t(sigma), **cond);   D = the x0 out implies.

t(sigma), the timestep the network is told:
  "log"      linear interpolation of log sigma over the grid sigma_0 < ... < sigma_{T-1}: a fractional t (as
             diffusers' Euler / Heun schedulers and k-diffusion);
  "nearest"  that t rounded to the nearest grid timestep, an integer (diffusers' DPM-Solver / UniPC with
             Karras sigmas, k-diffusion's `quantize`).
sigma outside [sigma_0, sigma_{T-1}] maps to the end of the grid. The x0 conversion uses sigma itself, so D is
exact at every sigma when the network is exact at t(sigma).
"""
from typing import Any, Callable

import torch
from torch import Tensor

from ldm.diffusion.parameterization import check_parameterization
from ldm.diffusion.schedules import DiffusionSchedule

TIMESTEP_MAPS = ("log", "nearest")
SigmaDenoiser = Callable[..., Tensor]  # denoiser(x, sigma, **cond) -> x0 estimate; sigma a tensor [B]


def log_sigma_grid(schedule: DiffusionSchedule) -> Tensor:
    """log sigma_t = 0.5 log((1 - acp_t) / acp_t) for t = 0 .. T-1, ascending, float64 on the CPU."""
    acp = schedule.alphas_cumprod.detach().to("cpu", torch.float64)
    return 0.5 * (torch.log1p(-acp) - torch.log(acp))


def interpolate_log_sigma(log_sigmas: Tensor, t: Tensor) -> Tensor:
    """sigma at fractional timesteps t (any shape), log sigma linear between grid points; float64."""
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(log_sigmas) - 1)
    low = t.floor().long().clamp(max=len(log_sigmas) - 2)
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


def sigma_to_t(log_sigmas: Tensor, sigma: Tensor, timestep_map: str = "log") -> Tensor:
    """The (fractional, or nearest integer) timestep of each sigma; same shape and dtype as sigma."""
    if timestep_map not in TIMESTEP_MAPS:
        raise ValueError(f"timestep_map {timestep_map!r} is not supported; choose one of {TIMESTEP_MAPS}")
    grid = log_sigmas.to(device=sigma.device, dtype=sigma.dtype)                     # (T,)
    log_sigma = sigma.clamp(min=1e-10).log()
    low = (torch.searchsorted(grid, log_sigma.contiguous(), right=True) - 1).clamp(0, len(grid) - 2)
    w = ((log_sigma - grid[low]) / (grid[low + 1] - grid[low])).clamp(0, 1)
    t = low.to(sigma.dtype) + w
    return t.round() if timestep_map == "nearest" else t


def x0_from_output(parameterization: str, output: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """x0 implied by the network output at x = x0 + sigma eps (sigma broadcastable to x)."""
    if parameterization == "eps":
        return x - sigma * output
    if parameterization == "x0":
        return output
    c_in = 1 / (sigma ** 2 + 1).sqrt()
    return c_in ** 2 * x - sigma * c_in * output  # x0 = a x_t - b v with a = c_in, b = sigma c_in, x_t = c_in x


class DiscreteDenoiser:
    """D(x, sigma, **cond) over a discrete model `model(x_t, t, **cond)` with the given schedule.

    timestep_map "log" hands the network fractional timesteps (a float tensor), "nearest" integer ones
    (a long tensor, like the discrete samplers). clip_denoised clamps D to [-1, 1] (pixel-space models).
    """

    def __init__(self, model: Callable[..., Tensor], schedule: DiffusionSchedule, parameterization: str = "eps",
                 timestep_map: str = "log", clip_denoised: bool = False):
        check_parameterization(parameterization)
        if timestep_map not in TIMESTEP_MAPS:
            raise ValueError(f"timestep_map {timestep_map!r} is not supported; choose one of {TIMESTEP_MAPS}")
        self.model, self.parameterization = model, parameterization
        self.timestep_map, self.clip_denoised = timestep_map, clip_denoised
        self.log_sigmas = log_sigma_grid(schedule)                                  # (T,) float64, CPU
        self.num_timesteps = len(self.log_sigmas)

    @property
    def sigma_min(self) -> float:
        return self.log_sigmas[0].exp().item()

    @property
    def sigma_max(self) -> float:
        return self.log_sigmas[-1].exp().item()

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        return interpolate_log_sigma(self.log_sigmas, torch.as_tensor(t))

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return sigma_to_t(self.log_sigmas, sigma, self.timestep_map)

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).expand(x.shape[0])   # (B,)
        s = sigma.view(-1, *([1] * (x.ndim - 1)))                                         # (B, 1, ..., 1)
        t = self.sigma_to_t(sigma)
        t = t.long() if self.timestep_map == "nearest" else t
        output = self.model(x / (s ** 2 + 1).sqrt(), t, **cond)                          # (B, ...)
        if output.shape != x.shape:
            raise ValueError(f"DiscreteDenoiser: model output shape {tuple(output.shape)} differs from "
                             f"x shape {tuple(x.shape)}")
        x0 = x0_from_output(self.parameterization, output, x, s)
        return x0.clamp(-1.0, 1.0) if self.clip_denoised else x0

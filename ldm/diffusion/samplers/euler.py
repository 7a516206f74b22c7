"""Euler, Euler ancestral and Heun over the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma
(Karras et al. 2022, Algorithms 1-2 without churn; k-diffusion's sample_euler / _euler_ancestral / _heun).

Euler with the DDIM timesteps is DDIM (eta 0): both move x along (x - D) / sigma to the next sigma.
"""
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from ldm.diffusion.samplers.common import randn_like
from ldm.diffusion.samplers.sigma_common import (SigmaCallback, ancestral_step, check_eta, check_sigmas,
                                                 denoised_at)


@torch.no_grad()
def sample_euler(denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[Mapping[str, Any]] = None,
                 callback: Optional[SigmaCallback] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """First order: x_next = D + (sigma_next / sigma) (x - D), one denoiser call per step."""
    sigmas = check_sigmas(sigmas, x)
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = denoised_at(denoiser, x, s, extra_args)
        x = denoised + (s_next / s) * (x - denoised)
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[Mapping[str, Any]] = None,
                           callback: Optional[SigmaCallback] = None, generator: Optional[torch.Generator] = None,
                           eta: float = 1.0) -> Tensor:
    """An Euler step to sigma_down, then noise of std sigma_up (`ancestral_step`); eta 0 is plain Euler."""
    check_eta(eta, "sample_euler_ancestral")
    sigmas = check_sigmas(sigmas, x)
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = denoised_at(denoiser, x, s, extra_args)
        down, up = ancestral_step(s, s_next, eta)
        x = denoised + (down / s) * (x - denoised)
        if up > 0:
            x = x + up * randn_like(x, generator)
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_heun(denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[Mapping[str, Any]] = None,
                callback: Optional[SigmaCallback] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Second order (trapezoidal): an Euler step, then the mean of the slopes at both ends; two calls per step
    except the last step to sigma = 0, which is Euler (Karras et al. 2022, Algorithm 1)."""
    sigmas = check_sigmas(sigmas, x)
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = denoised_at(denoiser, x, s, extra_args)
        slope = (x - denoised) / s
        if s_next == 0:
            x = denoised
        else:
            x_euler = x + (s_next - s) * slope
            slope_next = (x_euler - denoised_at(denoiser, x_euler, s_next, extra_args)) / s_next
            x = x + (s_next - s) * (slope + slope_next) / 2
        if callback is not None:
            callback(i, x, denoised)
    return x

"""DPM-Solver++ (Lu et al. 2022b) in data prediction, written in lambda = -log sigma on x = x0 + sigma eps:
2M (multistep, second order), 2M SDE (its stochastic variant) and 2S ancestral (single step, with noise).

With h = lambda_next - lambda, the first-order step is x_next = (sigma_next / sigma) x + (1 - e^-h) D;
the multistep methods correct D by the previous D (midpoint form, as diffusers' default solver_type), the
single-step one evaluates D half-way (in lambda) first. A step to sigma = 0 returns D itself.
"""
import math
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from ldm.diffusion.samplers.common import randn_like
from ldm.diffusion.samplers.sigma_common import (SigmaCallback, ancestral_step, check_eta, check_sigmas,
                                                 denoised_at)


def sample_dpmpp_2m(denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[Mapping[str, Any]] = None,
                    callback: Optional[SigmaCallback] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """DPM-Solver++(2M), Algorithm 2: one call per step, D extrapolated with the previous step's D; the 2M SDE
    step below without its noise (eta 0): x_next = (sigma_next / sigma) x + (1 - e^-h) (D + (h / 2 h_last)(D - D_old))."""
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, extra_args, callback, generator, eta=0.0)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[Mapping[str, Any]] = None,
                        callback: Optional[SigmaCallback] = None, generator: Optional[torch.Generator] = None,
                        eta: float = 1.0) -> Tensor:
    """DPM-Solver++(2M) SDE (midpoint): each step shrinks x by e^{-eta h} more and adds fresh Gaussian noise of std
    sigma_next sqrt(1 - e^{-2 eta h}) (independent per step, as diffusers; k-diffusion draws Brownian-tree noise);
    eta 0 is 2M."""
    check_eta(eta, "sample_dpmpp_2m_sde")
    sigmas = check_sigmas(sigmas, x)
    old, h_last = None, None
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = denoised_at(denoiser, x, s, extra_args)
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s / s_next)
            gain = -math.expm1(-h - eta * h)                    # 1 - e^{-(1 + eta) h}
            x = (s_next / s) * math.exp(-eta * h) * x + gain * denoised
            if old is not None:
                x = x + 0.5 * gain * (h / h_last) * (denoised - old)
            if eta > 0:
                x = x + s_next * math.sqrt(-math.expm1(-2 * eta * h)) * randn_like(x, generator)
            h_last = h
        old = denoised
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[Mapping[str, Any]] = None,
                              callback: Optional[SigmaCallback] = None, generator: Optional[torch.Generator] = None,
                              eta: float = 1.0) -> Tensor:
    """DPM-Solver++(2S) to sigma_down with its intermediate at sqrt(sigma sigma_down) (half-way in lambda), then
    noise of std sigma_up (`ancestral_step`); two calls per step, the last step to 0 one. eta 0: DPM-Solver++(2S)."""
    check_eta(eta, "sample_dpmpp_2s_ancestral")
    sigmas = check_sigmas(sigmas, x)
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = denoised_at(denoiser, x, s, extra_args)
        down, up = ancestral_step(s, s_next, eta)
        if down == 0:
            x = denoised
        else:
            h = math.log(s / down)
            s_mid = math.sqrt(s * down)
            x_mid = (s_mid / s) * x + (-math.expm1(-h / 2)) * denoised
            x = (down / s) * x + (-math.expm1(-h)) * denoised_at(denoiser, x_mid, s_mid, extra_args)
        if up > 0:
            x = x + up * randn_like(x, generator)
        if callback is not None:
            callback(i, x, denoised)
    return x

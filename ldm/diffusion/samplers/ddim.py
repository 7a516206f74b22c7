"""DDIM sampling (Song et al. 2021): a `steps`-long sub-sequence of timesteps, stochasticity eta."""
import math
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ldm.diffusion.samplers.common import (Denoiser, StepCallback, Trace, blend_known, check_inputs,
                                           denoise, initial_noise, randn_like, steps_iter)
from ldm.diffusion.schedules import DiffusionSchedule
from ldm.diffusion.timesteps import sampling_timesteps


def ddim_step(eps: Tensor, x0: Tensor, alpha: float, alpha_prev: float, eta: float = 0.0,
              generator: Optional[torch.Generator] = None) -> Tensor:
    """x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z (DDIM eq. 12).

    alpha, alpha_prev are alphas_cumprod at the current and next timestep; sigma = eta * the DDPM
    posterior std between them (eta = 1: ancestral on the sub-sequence, eta = 0: deterministic).
    """
    sigma = eta * math.sqrt((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev))
    x_prev = math.sqrt(alpha_prev) * x0 + math.sqrt(max(1 - alpha_prev - sigma ** 2, 0.0)) * eps
    return x_prev + sigma * randn_like(x0, generator) if sigma > 0 else x_prev


def alphas_along(schedule: DiffusionSchedule, timesteps: Sequence[int]) -> list:
    """alphas_cumprod at each visited timestep and then 1.0: the last step lands on the x0 prediction.

    (CompVis ends at alphas_cumprod[0] = 1 - beta_1, leaving noise of std sqrt(beta_1) in the result.)
    """
    acp = schedule.alphas_cumprod.detach().to("cpu", torch.float64)
    return [acp[t].item() for t in timesteps] + [1.0]


@torch.no_grad()
def sample_ddim(model: Denoiser, shape_or_x_T: Sequence[int] | Tensor, schedule: DiffusionSchedule,
                steps: int = 50, parameterization: str = "eps", eta: float = 0.0,
                discretize: str = "uniform", clip_denoised: bool = False,
                extra_args: Optional[Mapping[str, Any]] = None, start_t: Optional[int] = None,
                mask: Optional[Tensor] = None, x0: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None, callback: Optional[StepCallback] = None,
                return_intermediates: bool = False, progress: bool = False):
    """DDIM over `sampling_timesteps(T, steps, discretize, start_t)`; other arguments as `sample_ddpm`.

    x_T is at the first visited timestep: the top of the sub-sequence, or `start_t` when given.
    """
    if eta < 0:
        raise ValueError(f"sample_ddim: eta must be >= 0, got {eta}")
    x = initial_noise(shape_or_x_T, schedule, generator)
    check_inputs(x, parameterization, mask, x0)
    timesteps = sampling_timesteps(schedule.num_timesteps, steps, discretize, start_t).tolist()
    alphas = alphas_along(schedule, timesteps)
    trace = Trace(len(timesteps), callback, return_intermediates)
    for i, t in enumerate(steps_iter(timesteps, progress, "DDIM")):
        x = blend_known(x, t, mask, x0, schedule, generator)
        eps, x0_pred = denoise(model, x, t, schedule, parameterization, extra_args, clip_denoised)
        x = ddim_step(eps, x0_pred, alphas[i], alphas[i + 1], eta, generator)
        trace(i, x, x0_pred)
    return trace.result(blend_known(x, None, mask, x0, schedule, generator))

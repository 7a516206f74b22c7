"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) through the posterior q(x_{t-1} | x_t, x0_pred)."""
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ldm.diffusion.gaussian import q_posterior
from ldm.diffusion.samplers.common import (Denoiser, StepCallback, Trace, blend_known, check_inputs,
                                           denoise, initial_noise, randn_like, steps_iter, timestep_batch)
from ldm.diffusion.schedules import DiffusionSchedule


@torch.no_grad()
def sample_ddpm(model: Denoiser, shape_or_x_T: Sequence[int] | Tensor, schedule: DiffusionSchedule,
                parameterization: str = "eps", clip_denoised: bool = False,
                extra_args: Optional[Mapping[str, Any]] = None, start_t: Optional[int] = None,
                mask: Optional[Tensor] = None, x0: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None, callback: Optional[StepCallback] = None,
                return_intermediates: bool = False, progress: bool = False):
    """Run t = start_t, ..., 0 with x_{t-1} = mu_tilde(x_t, x0_pred) + sigma_t z (z = 0 at t = 0).

    mu_tilde with x0_pred from the eps prediction is Algorithm 2's mean; sigma_t^2 is the schedule's
    posterior variance. Arguments shared by all samplers:
      model             denoiser `model(x, t, **extra_args)` returning the raw `parameterization` output
      shape_or_x_T      starting latent (its device/dtype are used throughout) or a shape for N(0, I)
      start_t           timestep x_T is at (default T - 1); img2img: x_T = q_sample(x_init, start_t, noise)
      mask, x0          inpainting: where mask = 1 the sample is x0 noised to the current timestep
      generator         source of every random draw (same seed, same result)
      callback          callback(i, x, x0_pred) after step i
      return_intermediates  also return ~10 x0 predictions spread over the run
    """
    x = initial_noise(shape_or_x_T, schedule, generator)
    check_inputs(x, parameterization, mask, x0)
    T = schedule.num_timesteps
    start_t = T - 1 if start_t is None else start_t
    if not 0 <= start_t < T:
        raise ValueError(f"sample_ddpm: start_t must be in [0, {T - 1}], got {start_t}")
    timesteps = list(range(start_t, -1, -1))
    trace = Trace(len(timesteps), callback, return_intermediates)
    for i, t in enumerate(steps_iter(timesteps, progress, "DDPM")):
        x = blend_known(x, t, mask, x0, schedule, generator)
        _, x0_pred = denoise(model, x, t, schedule, parameterization, extra_args, clip_denoised)
        mean, _, log_variance = q_posterior(x0_pred, x, timestep_batch(t, x), schedule)
        x = mean if t == 0 else mean + torch.exp(0.5 * log_variance) * randn_like(x, generator)
        trace(i, x, x0_pred)
    return trace.result(blend_known(x, None, mask, x0, schedule, generator))

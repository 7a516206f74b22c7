"""PLMS sampling (Liu et al. 2022, PNDM; the LDM variant): deterministic DDIM steps driven by an
Adams-Bashforth combination of past eps predictions, bootstrapped by a 2nd-order (Heun) first step."""
from typing import Any, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ldm.diffusion.gaussian import predict_x0_from_eps
from ldm.diffusion.samplers.common import (Denoiser, StepCallback, Trace, blend_known, check_inputs,
                                           clip_x0, denoise, initial_noise, steps_iter, timestep_batch)
from ldm.diffusion.samplers.ddim import alphas_along, ddim_step
from ldm.diffusion.schedules import DiffusionSchedule
from ldm.diffusion.timesteps import sampling_timesteps


def multistep_eps(eps: Tensor, history: List[Tensor]) -> Tensor:
    """Adams-Bashforth of order len(history) + 1 (at most 4); history holds past eps, oldest first."""
    if not history:
        return eps
    if len(history) == 1:
        return (3 * eps - history[-1]) / 2
    if len(history) == 2:
        return (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


@torch.no_grad()
def sample_plms(model: Denoiser, shape_or_x_T: Sequence[int] | Tensor, schedule: DiffusionSchedule,
                steps: int = 50, parameterization: str = "eps", discretize: str = "uniform",
                clip_denoised: bool = False, extra_args: Optional[Mapping[str, Any]] = None,
                start_t: Optional[int] = None, mask: Optional[Tensor] = None, x0: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None, callback: Optional[StepCallback] = None,
                return_intermediates: bool = False, progress: bool = False):
    """PLMS over the DDIM timesteps; arguments as `sample_ddim` (no eta: PLMS is deterministic).

    The first step costs two model calls, every later step one.
    """
    x = initial_noise(shape_or_x_T, schedule, generator)
    check_inputs(x, parameterization, mask, x0)
    timesteps = sampling_timesteps(schedule.num_timesteps, steps, discretize, start_t).tolist()
    alphas = alphas_along(schedule, timesteps)
    args = (schedule, parameterization, extra_args, clip_denoised)
    history: List[Tensor] = []
    trace = Trace(len(timesteps), callback, return_intermediates)
    for i, t in enumerate(steps_iter(timesteps, progress, "PLMS")):
        x = blend_known(x, t, mask, x0, schedule, generator)
        eps, x0_pred = denoise(model, x, t, *args)
        if i == 0 and len(timesteps) > 1:  # Heun: average eps here and at the Euler (DDIM) estimate
            x_next = ddim_step(eps, x0_pred, alphas[0], alphas[1])
            eps_prime = (eps + denoise(model, x_next, timesteps[1], *args)[0]) / 2
        else:
            eps_prime = multistep_eps(eps, history)
        history = (history + [eps])[-3:]
        eps_prime, x0_pred = _x0_from_eps(x, t, eps_prime, schedule, clip_denoised)
        x = ddim_step(eps_prime, x0_pred, alphas[i], alphas[i + 1])
        trace(i, x, x0_pred)
    return trace.result(blend_known(x, None, mask, x0, schedule, generator))


def _x0_from_eps(x: Tensor, t: int, eps: Tensor, schedule: DiffusionSchedule, clip: bool):
    t_batch = timestep_batch(t, x)
    x0 = predict_x0_from_eps(x, t_batch, eps, schedule)
    return clip_x0(x, t_batch, eps, x0, schedule) if clip else (eps, x0)

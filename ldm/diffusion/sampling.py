"""One entry point over every sampler, for any discrete-time model (eps, x0 or v): the discrete samplers on
integer timesteps (DDPM, DDIM, PLMS) and the sigma samplers over a `DiscreteDenoiser` of the same model (Euler,
Euler ancestral, Heun, DPM++ 2M / 2M SDE / 2S ancestral, UniPC), each with img2img (init + strength) and
inpainting (mask + x0, mask = 1 known). Classifier-free guidance wraps `model` before it gets here
(`CFGDenoiser`), so every sampler shares it.

The sigma samplers start from x_T scaled to sqrt(sigma_max^2 + 1) x_T: the variance-exploding form of the
x_T ~ N(0, I) the discrete samplers start from, so that the same noise gives comparable samples.
"""
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.diffusion import editing
from ldm.diffusion.denoiser import DiscreteDenoiser
from ldm.diffusion.gaussian import q_sample
from ldm.diffusion.samplers import sample_ddim, sample_ddpm, sample_plms
from ldm.diffusion.samplers.common import Trace, initial_noise
from ldm.diffusion.samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_2s_ancestral
from ldm.diffusion.samplers.euler import sample_euler, sample_euler_ancestral, sample_heun
from ldm.diffusion.samplers.unipc import sample_unipc
from ldm.diffusion.schedules import DiffusionSchedule
from ldm.diffusion.sigma_schedules import SIGMA_SCHEDULES, make_sigmas

DISCRETE_SAMPLERS = ("ddpm", "ddim", "plms")
SIGMA_SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler, "euler_a": sample_euler_ancestral, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde, "dpmpp_2s_a": sample_dpmpp_2s_ancestral, "unipc": sample_unipc}
SAMPLERS = DISCRETE_SAMPLERS + tuple(SIGMA_SAMPLERS)
STOCHASTIC_SIGMA_SAMPLERS = ("euler_a", "dpmpp_2m_sde", "dpmpp_2s_a")  # take eta, default 1


def check_sampler(sampler: str, sigma_schedule: str = "uniform") -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if sigma_schedule not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown sigma schedule {sigma_schedule!r}; choose one of {SIGMA_SCHEDULES}")
    if sampler in DISCRETE_SAMPLERS and sigma_schedule != "uniform":
        raise ValueError(f"the {sampler} sampler walks the model's own timesteps; the sigma schedule "
                         f"{sigma_schedule!r} is for the sigma samplers {tuple(SIGMA_SAMPLERS)}")


def resolve_eta(sampler: str, eta: Optional[float]) -> float:
    """eta, or its default (1 for the ancestral / SDE samplers, else 0); an error where a sampler takes none."""
    if eta is not None and eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if sampler in STOCHASTIC_SIGMA_SAMPLERS:
        return 1.0 if eta is None else float(eta)
    if sampler in ("ddim", "ddpm"):  # DDPM is ancestral at every timestep: eta unused
        return 0.0 if eta is None else float(eta)
    if eta:
        raise ValueError(f"the {sampler} sampler is deterministic; eta must be 0, got {eta}")
    return 0.0


def model_evaluations(sampler: str, steps: int, num_timesteps: int) -> int:
    """Network evaluations of one full run (guidance doubles the batch, not the count)."""
    if sampler == "ddpm":
        return num_timesteps
    if sampler in ("heun", "dpmpp_2s_a"):  # two per step, one for the last step to sigma = 0
        return 2 * steps - 1
    return steps + 1 if sampler == "plms" and steps > 1 else steps


@torch.no_grad()
def run_sampler(model: Callable[..., Tensor], shape_or_x_T: Sequence[int] | Tensor, schedule: DiffusionSchedule,
                parameterization: str = "eps", sampler: str = "ddim", steps: int = 50, eta: Optional[float] = None,
                sigma_schedule: str = "uniform", rho: float = 7.0, timestep_map: str = "log",
                clip_denoised: bool = False, extra_args: Optional[Mapping[str, Any]] = None,
                init: Optional[Tensor] = None, strength: Optional[float] = None, mask: Optional[Tensor] = None,
                x0: Optional[Tensor] = None, start_t: Optional[int] = None,
                generator: Optional[torch.Generator] = None, callback=None, return_intermediates: bool = False,
                progress: bool = False):
    """Samples of `model(x_t, t, **extra_args)` (raw `parameterization` output) from x_T (or noise of a shape).

    init, strength: img2img, x_T is the noise added to init (`editing`); mask (1 = known), x0: inpainting (x0
    defaults to init); start_t: a discrete sampler's starting timestep with x_T already noised there.
    callback(i, x, x0_pred) after step i; return_intermediates: also ~10 x0 predictions along the way.
    """
    check_sampler(sampler, sigma_schedule)
    eta = resolve_eta(sampler, eta)
    noise = initial_noise(shape_or_x_T, schedule, generator)
    x0 = init if x0 is None and mask is not None else x0
    _check_edit(noise, init, strength, mask, x0, start_t, sampler)
    if sampler in DISCRETE_SAMPLERS:
        return _run_discrete(model, noise, schedule, parameterization, sampler, steps, eta, clip_denoised,
                             extra_args, init, strength, mask, x0, start_t, generator, callback,
                             return_intermediates, progress)
    denoiser = DiscreteDenoiser(model, schedule, parameterization, timestep_map, clip_denoised)
    n = steps if strength is None else editing.strength_steps(strength, steps)
    t_max = None if strength is None else strength * (denoiser.num_timesteps - 1)
    sigmas = make_sigmas(sigma_schedule, n, denoiser.log_sigmas, t_max, rho)
    s0 = sigmas[0].item()
    x = noise * math.sqrt(s0 ** 2 + 1) if init is None else init.to(noise) + s0 * noise
    if mask is not None:
        x = editing.blend(x, mask, x0.to(noise) + s0 * noise)
        denoiser = editing.KnownRegionDenoiser(denoiser, mask, x0)
    trace = Trace(n, callback, return_intermediates)
    bar = tqdm(total=n, desc=sampler) if progress else None

    def step_done(i: int, x: Tensor, denoised: Tensor) -> None:
        trace(i, x, denoised)
        if bar is not None:
            bar.update(1)

    options = {"eta": eta} if sampler in STOCHASTIC_SIGMA_SAMPLERS else {}
    x = SIGMA_SAMPLERS[sampler](denoiser, x, sigmas.to(x.device), extra_args, step_done, generator, **options)
    if bar is not None:
        bar.close()
    return trace.result(editing.blend(x, mask, x0))


def _run_discrete(model, noise, schedule, parameterization, sampler, steps, eta, clip_denoised, extra_args, init,
                  strength, mask, x0, start_t, generator, callback, return_intermediates, progress):
    x_T = noise
    if init is not None:
        start_t = editing.discrete_start_t(sampler, strength, steps, schedule.num_timesteps)
        t = torch.full((noise.shape[0],), start_t, device=noise.device, dtype=torch.long)
        x_T = q_sample(init.to(noise), t, noise, schedule)
    common = dict(parameterization=parameterization, clip_denoised=clip_denoised, extra_args=extra_args,
                  start_t=start_t, mask=mask, x0=x0, generator=generator, callback=callback,
                  return_intermediates=return_intermediates, progress=progress)
    if sampler == "ddpm":
        return sample_ddpm(model, x_T, schedule, **common)
    if sampler == "plms":
        return sample_plms(model, x_T, schedule, steps=steps, **common)
    return sample_ddim(model, x_T, schedule, steps=steps, eta=eta, **common)


def _check_edit(x: Tensor, init: Optional[Tensor], strength: Optional[float], mask: Optional[Tensor],
                x0: Optional[Tensor], start_t: Optional[int], sampler: str) -> None:
    if (init is None) != (strength is None):
        raise ValueError("img2img needs both `init` (the image to start from) and `strength`")
    if strength is not None:
        editing.check_strength(strength)
    if init is not None and init.shape != x.shape:
        raise ValueError(f"init shape {tuple(init.shape)} differs from x_T shape {tuple(x.shape)}")
    if (mask is None) != (x0 is None):
        raise ValueError("inpainting needs both `mask` (1 = known) and `x0` (the known content, or `init`)")
    if x0 is not None and x0.shape != x.shape:
        raise ValueError(f"x0 shape {tuple(x0.shape)} differs from x_T shape {tuple(x.shape)}")
    if start_t is not None and (init is not None or sampler not in DISCRETE_SAMPLERS):
        raise ValueError("start_t is for the discrete samplers with x_T noised there; use init + strength")

"""Each sampler against its diffusers scheduler: the same model (a nonlinear eps-network of (x_t, t)), the same
schedule and starting noise, and for the stochastic ones the same generator, agree to 1e-4 (float32).

Timesteps the network is told: diffusers' Euler / Heun interpolate log sigma (our timestep_map "log");
DPM-Solver++ and UniPC with Karras sigmas round that timestep ("nearest"). With exponential sigmas diffusers'
DPM-Solver / UniPC truncate it to an integer instead, which no map of ours reproduces, so they are compared on
Karras sigmas only. DPM++ 2S ancestral has no diffusers counterpart (KDPM2Ancestral is DPM-2 ancestral;
DPMSolverSinglestep's 2S puts its intermediate point on the schedule and adds no noise); its order and
distribution are tested in tests/test_sigma_samplers.py. UniPC-bh1 is not compared: diffusers' bh1 returns NaN on
the last step to sigma = 0 (B(h) = h is infinite there); ours returns D.
"""
import warnings

import pytest
import torch

from ldm.diffusion.denoiser import DiscreteDenoiser
from ldm.diffusion.samplers import sample_ddim
from ldm.diffusion.sampling import SIGMA_SAMPLERS
from ldm.diffusion.schedules import make_schedule
from ldm.diffusion.sigma_schedules import make_sigmas

diffusers = pytest.importorskip("diffusers")
N, B = 12, 4
SCHEDULE = make_schedule("linear", 1000, 0.00085, 0.012)  # SD 1.x


def model(x, t):
    """Any smooth eps-network of (x_t, t), t fractional or integer."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x) * (1 + t / 1000) + 0.1 * torch.sin(3 * x)


def noise():
    return torch.randn(B, 3, 5, 5, generator=torch.Generator().manual_seed(0))


def scheduler(name, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(diffusers, name)(num_train_timesteps=1000, trained_betas=SCHEDULE.betas.numpy(), **config)


def run_diffusers(sch, steps=N, seed=1):
    """diffusers' sampling loop from noise(); returns the sample and the scheduler's sigmas."""
    sch.set_timesteps(steps)
    x, g = noise() * sch.init_noise_sigma, torch.Generator().manual_seed(seed)
    takes_generator = "generator" in sch.step.__code__.co_varnames
    for t in sch.timesteps:
        out = model(sch.scale_model_input(x, t), t.expand(B))
        x = (sch.step(out, t, x, generator=g) if takes_generator else sch.step(out, t, x)).prev_sample
    return x


CASES = [  # (our sampler, diffusers scheduler, its config, our sigma schedule, timestep map[, our options])
    ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": True}, "karras", "log"),
    ("euler", "EulerDiscreteScheduler", {"use_exponential_sigmas": True}, "exponential", "log"),
    ("euler", "EulerDiscreteScheduler", {}, "uniform", "log"),
    ("euler_a", "EulerAncestralDiscreteScheduler", {}, "uniform", "log"),
    ("heun", "HeunDiscreteScheduler", {"use_karras_sigmas": True}, "karras", "log"),
    ("heun", "HeunDiscreteScheduler", {"use_exponential_sigmas": True}, "exponential", "log"),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
     "karras", "nearest"),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
     "karras", "nearest"),
    ("unipc", "UniPCMultistepScheduler", {"use_karras_sigmas": True}, "karras", "nearest"),
    ("unipc", "UniPCMultistepScheduler", {"use_karras_sigmas": True, "solver_order": 3}, "karras", "nearest",
     {"order": 3}),
]


@pytest.mark.parametrize("sampler, name, config, schedule, timestep_map, options",
                         [c if len(c) == 6 else (*c, {}) for c in CASES],
                         ids=[f"{c[0]}-{c[3]}" + ("-order3" if len(c) == 6 else "") for c in CASES])
def test_sampler_agrees_with_its_diffusers_scheduler(sampler, name, config, schedule, timestep_map, options):
    steps = 10 if schedule == "uniform" else N  # 10: linspace(999, 0, 10) is integer, where both interpolations agree
    sch = scheduler(name, **config)
    expected = run_diffusers(sch, steps)
    denoiser = DiscreteDenoiser(model, SCHEDULE, "eps", timestep_map)
    sigmas = make_sigmas(schedule, steps, denoiser.log_sigmas)
    theirs = sch.sigmas.double().unique_consecutive()  # Heun repeats its inner sigmas
    assert torch.allclose(sigmas, theirs, rtol=1e-5, atol=1e-6)
    vp = name.startswith(("DPMSolver", "UniPC"))  # these start from noise at x_t = x / sqrt(sigma^2 + 1)
    x = noise() * ((sigmas[0] ** 2 + 1).sqrt().item() if vp else sch.init_noise_sigma)
    out = SIGMA_SAMPLERS[sampler](denoiser, x, sigmas, generator=torch.Generator().manual_seed(1), **options)
    assert (out - expected).abs().max().item() < 1e-4


def test_ddim_agrees_with_diffusers_ddim_scheduler():
    sch = scheduler("DDIMScheduler", clip_sample=False, set_alpha_to_one=True, steps_offset=1,
                    timestep_spacing="leading")
    expected = run_diffusers(sch, 20)
    out = sample_ddim(lambda x, t: model(x, t), noise(), SCHEDULE.to(dtype=torch.float32), steps=20)
    assert (out - expected).abs().max().item() < 1e-4

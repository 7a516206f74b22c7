"""The sigma samplers on Gaussian mixtures with the exact denoiser: order of convergence against steps, the
distribution they sample, DDIM = Euler, the continuous-sigma wrapper of discrete models, sigma schedules."""
import math

import pytest
import torch

from ldm.diffusion.denoiser import DiscreteDenoiser, interpolate_log_sigma, log_sigma_grid, sigma_to_t
from ldm.diffusion.samplers import sample_ddim
from ldm.diffusion.samplers.unipc import sample_unipc
from ldm.diffusion.sampling import SAMPLERS, SIGMA_SAMPLERS, model_evaluations, run_sampler
from ldm.diffusion.schedules import make_schedule
from ldm.diffusion.sigma_schedules import exponential_sigmas, karras_sigmas, make_sigmas, uniform_sigmas
from ldm.diffusion.timesteps import sampling_timesteps
from tests.gaussian_mixture import F64, Mixture, discrete_model
from tests.test_samplers import one_thread  # noqa: F401 - autouse fixture

MIX_2D = Mixture([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.5]], [0.3, 0.5])
MIX_1D = Mixture([0.3, 0.7], [[-1.0], [1.5]], [0.3, 0.4])
SIGMA_MIN, SIGMA_MAX = 0.01, 20.0
STEPS = (8, 16, 32, 64)


@pytest.fixture(scope="module")
def linear():
    return make_schedule("linear", 1000, 1e-4, 2e-2)


def fitted_order(steps, errors):
    """Least-squares slope of -log(error) against log(steps)."""
    x, y = torch.tensor(steps, dtype=F64).log(), -torch.tensor(errors, dtype=F64).log()
    x, y = x - x.mean(), y - y.mean()
    return ((x * y).sum() / (x * x).sum()).item()


def ode_solution(denoiser, x, sigma_start, n=2000):
    """The probability-flow ODE from sigma_start to 0: Heun on n Karras steps to 1e-4, then D (error ~1e-8)."""
    x = SIGMA_SAMPLERS["heun"](denoiser, x, karras_sigmas(n, 1e-4, sigma_start)[:-1])
    return denoiser(x, torch.full((len(x),), 1e-4, dtype=F64))


@pytest.fixture(scope="module")
def start_and_reference():
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * SIGMA_MAX
    return x, ode_solution(MIX_2D, x, SIGMA_MAX)


# ---- order of convergence ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler, kw, low, high", [
    ("euler", {}, 0.85, 1.2),
    ("euler_a", {"eta": 0.0}, 0.85, 1.2),          # eta 0: plain Euler
    ("heun", {}, 1.8, 2.6),
    ("dpmpp_2m", {}, 1.8, 2.6),
    ("dpmpp_2m_sde", {"eta": 0.0}, 1.8, 2.6),      # eta 0: 2M
    ("dpmpp_2s_a", {"eta": 0.0}, 1.8, 2.6),        # eta 0: DPM-Solver++(2S)
    ("unipc", {}, 2.6, 3.8),                       # UniP-2 with UniC: one order more (Zhao et al. 2023)
])
def test_error_against_steps_shows_the_order(start_and_reference, sampler, kw, low, high):
    """Same start, Karras sigmas down to 0; error of the final sample against the ODE's solution."""
    x, reference = start_and_reference
    errors = []
    for n in STEPS:
        out = SIGMA_SAMPLERS[sampler](MIX_2D, x, karras_sigmas(n, SIGMA_MIN, SIGMA_MAX), **kw)
        errors.append((out - reference).norm(dim=1).mean().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert low < fitted_order(STEPS, errors) < high, errors


def test_ddim_is_euler_on_the_sigmas_of_its_timesteps(linear):
    """DDIM (eta 0) moves x/sqrt(acp) along (x - D)/sigma: the Euler step in sigma."""
    model = discrete_model(MIX_2D, linear, "v")
    x_T = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    ddim = sample_ddim(model, x_T, linear, steps=10, parameterization="v")
    t = sampling_timesteps(1000, 10)
    sigmas = torch.cat([((1 - linear.alphas_cumprod[t]) / linear.alphas_cumprod[t]).sqrt(), torch.zeros(1, dtype=F64)])
    euler = SIGMA_SAMPLERS["euler"](DiscreteDenoiser(model, linear, "v"), x_T * (sigmas[0] ** 2 + 1).sqrt(), sigmas)
    assert torch.allclose(ddim, euler, atol=1e-10)


def test_ddim_error_against_steps_is_first_order(linear):
    """DDIM from the top timestep (start_t = T - 1) to x0, against the ODE solution from that noise level."""
    model = discrete_model(MIX_2D, linear, "eps")
    sigma_top = math.exp(log_sigma_grid(linear)[-1].item())
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(2), dtype=F64) * 5
    reference = ode_solution(DiscreteDenoiser(model, linear), x, sigma_top)
    x_T = x / math.sqrt(sigma_top ** 2 + 1)                         # the same point in x_t = sqrt(acp) x0 + ... form
    errors = [(sample_ddim(model, x_T, linear, steps=n, start_t=999) - reference).norm(dim=1).mean().item()
              for n in STEPS]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert 0.8 < fitted_order(STEPS, errors) < 1.25, errors


def test_unipc_order_3_and_bh1_converge_too(start_and_reference):
    x, reference = start_and_reference
    for kw in ({"order": 3}, {"variant": "bh1"}):
        errors = [(sample_unipc(MIX_2D, x, karras_sigmas(n, SIGMA_MIN, SIGMA_MAX), **kw) - reference)
                  .norm(dim=1).mean().item() for n in STEPS]
        assert fitted_order(STEPS, errors) > 2.5, (kw, errors)


# ---- the distribution they sample ----------------------------------------------------------------------------------
def mixture_errors(x, mixture):
    """(|mean error|, relative variance error, |weight error| of the left component) of 1-D samples x (N, 1)."""
    x = x[:, 0]
    left = (x < (mixture.mu[0, 0] + mixture.mu[1, 0]) / 2).double().mean().item()
    return (abs(x.mean().item() - mixture.mean.item()), abs(x.var().item() / mixture.variance.item() - 1),
            abs(left - mixture.w[0].item()))


def exact_start(mixture, n, seed):
    """(data samples, noise): with strength 1 the sampler starts from data + sigma_max noise, the exact marginal
    (plain sampling from N(0, I) carries a start error of ~ data mean / sigma_max into the result)."""
    g = torch.Generator().manual_seed(seed)
    return mixture.sample(n, g), torch.randn(n, mixture.mu.shape[1], generator=g, dtype=F64)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_reproduces_the_mixture(linear, sampler):
    """100 steps (DDPM: every timestep of a 200-step schedule), 20000 samples: mean, variance, mode weights."""
    linear = make_schedule("linear", 200, 5e-4, 0.1) if sampler == "ddpm" else linear
    model = discrete_model(MIX_1D, linear, "v")
    init, noise = exact_start(MIX_1D, 20000, seed=3)
    schedule = "uniform" if sampler in ("ddpm", "ddim", "plms") else "karras"
    out = run_sampler(model, noise, linear, "v", sampler, steps=100, sigma_schedule=schedule, init=init,
                      strength=1.0, generator=torch.Generator().manual_seed(4))
    mean_err, var_err, weight_err = mixture_errors(out, MIX_1D)  # Monte Carlo s.e.: 0.008, 1.5%, 0.003
    assert mean_err < 0.025 and var_err < 0.05 and weight_err < 0.012, (mean_err, var_err, weight_err)


@pytest.mark.parametrize("sampler, steps", [("euler_a", 200), ("dpmpp_2m", 30), ("unipc", 30)])
def test_2d_mixture_mean_and_covariance(linear, sampler, steps):
    model = discrete_model(MIX_2D, linear, "eps")
    init, noise = exact_start(MIX_2D, 20000, seed=5)
    out = run_sampler(model, noise, linear, "eps", sampler, steps=steps, sigma_schedule="karras", init=init,
                      strength=1.0, generator=torch.Generator().manual_seed(6))
    mu, w, s = MIX_2D.mu, MIX_2D.w, MIX_2D.s
    true_cov = (w[:, None, None] * (torch.einsum("ki,kj->kij", mu, mu) + s[:, None, None] ** 2 * torch.eye(2))).sum(0) \
        - torch.outer(MIX_2D.mean, MIX_2D.mean)
    assert (out.mean(0) - MIX_2D.mean).abs().max() < 0.03
    assert ((torch.cov(out.T) - true_cov).abs().max() / true_cov.abs().max()) < 0.05


# ---- stochastic samplers, calls, callback --------------------------------------------------------------------------
@pytest.mark.parametrize("stochastic, deterministic", [("euler_a", "euler"), ("dpmpp_2m_sde", "dpmpp_2m")])
def test_eta_0_is_the_deterministic_sampler_and_seeds_reproduce(stochastic, deterministic):
    x, sig = torch.randn(16, 2, dtype=F64) * SIGMA_MAX, karras_sigmas(10, SIGMA_MIN, SIGMA_MAX)
    def run(seed, eta=1.0):
        return SIGMA_SAMPLERS[stochastic](MIX_2D, x, sig, generator=torch.Generator().manual_seed(seed), eta=eta)
    assert torch.equal(run(0), run(0)) and not torch.allclose(run(0), run(1))
    assert torch.allclose(run(0, eta=0.0), SIGMA_SAMPLERS[deterministic](MIX_2D, x, sig), atol=1e-12)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_model_evaluations_and_callback_per_step(linear, sampler):
    calls, steps_seen = [], []
    model = discrete_model(MIX_1D, linear, "eps")

    def counted(x, t):
        calls.append(t)
        return model(x, t)
    out, inter = run_sampler(counted, torch.zeros(3, 1, dtype=F64), linear, "eps", sampler, steps=7,
                             sigma_schedule="uniform", callback=lambda i, x, d: steps_seen.append(i),
                             return_intermediates=True, generator=torch.Generator().manual_seed(0))
    n_steps = 1000 if sampler == "ddpm" else 7
    assert len(calls) == model_evaluations(sampler, 7, 1000)
    assert steps_seen == list(range(n_steps)) and torch.isfinite(out).all() and 1 < len(inter) <= 10


def test_sampler_input_errors_are_clear():
    x = torch.zeros(2, 1, dtype=F64)
    with pytest.raises(ValueError, match="strictly descending"):
        SIGMA_SAMPLERS["euler"](MIX_1D, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="at least two sigmas"):
        SIGMA_SAMPLERS["heun"](MIX_1D, x, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="eta must be >= 0"):
        SIGMA_SAMPLERS["euler_a"](MIX_1D, x, karras_sigmas(3, 0.1, 1.0), eta=-1.0)
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        sample_unipc(MIX_1D, x, karras_sigmas(3, 0.1, 1.0), order=4)
    schedule = make_schedule("linear", 100)
    with pytest.raises(ValueError, match="unknown sampler 'lms'"):
        run_sampler(lambda x, t: x, x, schedule, sampler="lms")
    with pytest.raises(ValueError, match="sigma schedule 'karras' is for the sigma samplers"):
        run_sampler(lambda x, t: x, x, schedule, sampler="ddim", sigma_schedule="karras")
    with pytest.raises(ValueError, match="the heun sampler is deterministic; eta must be 0"):
        run_sampler(lambda x, t: x, x, schedule, sampler="heun", eta=0.5)


# ---- the continuous-sigma wrapper ----------------------------------------------------------------------------------
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_discrete_denoiser_is_the_exact_denoiser_at_any_sigma(linear, parameterization):
    denoiser = DiscreteDenoiser(discrete_model(MIX_2D, linear, parameterization), linear, parameterization)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(7), dtype=F64) * 3
    sigma = torch.exp(torch.empty(64, dtype=F64).uniform_(math.log(0.02), math.log(denoiser.sigma_max)))
    assert torch.allclose(denoiser(x, sigma), MIX_2D(x, sigma), atol=1e-10)


def test_sigma_to_t_inverts_the_grid_and_rounds_for_nearest(linear):
    log_sigmas = log_sigma_grid(linear)
    t = torch.tensor([0.0, 0.25, 17.6, 500.0, 998.9, 999.0], dtype=F64)
    sigma = interpolate_log_sigma(log_sigmas, t)
    assert torch.allclose(sigma_to_t(log_sigmas, sigma), t, atol=1e-9)
    assert sigma_to_t(log_sigmas, sigma, "nearest").tolist() == [0, 0, 18, 500, 999, 999]
    ends = sigma_to_t(log_sigmas, torch.tensor([1e-6, 1e6], dtype=F64))
    assert ends.tolist() == [0.0, 999.0]
    seen = []
    DiscreteDenoiser(lambda x, t: seen.append(t) or x, linear, timestep_map="nearest")(
        torch.zeros(2, 1), torch.tensor(sigma[2].item()))
    assert seen[0].dtype == torch.long and seen[0].tolist() == [18, 18]
    with pytest.raises(ValueError, match="timestep_map 'linear'"):
        DiscreteDenoiser(lambda x, t: x, linear, timestep_map="linear")


# ---- sigma schedules -----------------------------------------------------------------------------------------------
def test_karras_sigmas_are_equally_spaced_in_sigma_to_the_one_over_rho():
    sig = karras_sigmas(10, 0.03, 15.0, rho=7.0)
    assert sig[-1] == 0 and len(sig) == 11
    assert sig[0].item() == pytest.approx(15.0) and sig[-2].item() == pytest.approx(0.03)
    root = sig[:-1] ** (1 / 7)
    assert torch.allclose(root.diff(), torch.full((9,), (0.03 ** (1 / 7) - 15 ** (1 / 7)) / 9, dtype=F64))


def test_exponential_sigmas_are_equally_spaced_in_log_sigma():
    sig = exponential_sigmas(6, 0.03, 15.0)
    assert sig[-1] == 0 and sig[0].item() == pytest.approx(15.0) and sig[-2].item() == pytest.approx(0.03)
    assert torch.allclose(sig[:-1].log().diff(), torch.full((5,), math.log(0.03 / 15) / 5, dtype=F64))


def test_uniform_sigmas_are_the_grid_at_evenly_spaced_timesteps(linear):
    log_sigmas = log_sigma_grid(linear)
    sig = uniform_sigmas(10, log_sigmas)                              # t = 999, 888, ..., 0
    assert torch.allclose(sig[:-1], log_sigmas[torch.arange(999, -1, -111)].exp()) and sig[-1] == 0
    img2img = make_sigmas("karras", 5, log_sigmas, t_max=500.0)
    assert img2img[0].item() == pytest.approx(log_sigmas[500].exp().item())
    assert img2img[-2].item() == pytest.approx(log_sigmas[0].exp().item())
    with pytest.raises(ValueError, match="unknown sigma schedule 'cosine'"):
        make_sigmas("cosine", 5, log_sigmas)
    with pytest.raises(ValueError, match="positive int"):
        karras_sigmas(0, 0.1, 1.0)

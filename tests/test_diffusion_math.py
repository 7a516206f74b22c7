"""Schedules, Gaussian forward process / posterior, parameterisations, losses, timesteps: closed forms."""
import math
import pathlib
import re

import pytest
import torch

from ldm.diffusion import gaussian as G
from ldm.diffusion.losses import diffusion_loss, lvlb_weights, min_snr_weights, training_loss
from ldm.diffusion.parameterization import target_for, to_eps_x0
from ldm.diffusion.schedules import (BUFFER_NAMES, DiffusionSchedule, make_beta_schedule, make_schedule,
                                     schedule_buffers)
from ldm.diffusion.timesteps import ddim_timesteps, sample_timesteps, sampling_timesteps

SD = dict(beta_schedule="linear", timesteps=1000, linear_start=0.00085, linear_end=0.012)


@pytest.fixture(scope="module")
def sched():
    return make_schedule(**SD)


# ---------------------------------------------------------------- schedules

@pytest.mark.parametrize("name, first, last", [
    ("linear", 1e-4, 2e-2), ("sqrt_linear", 1e-4, 2e-2), ("sqrt", 1e-2, 2e-2 ** 0.5), ("cosine", None, 0.999)])
def test_beta_schedule_endpoints_and_monotone_alphas_cumprod(name, first, last):
    betas = make_beta_schedule(name, 1000)
    if first is None:  # cosine: beta_1 = 1 - f(1) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi/2)^2
        f = lambda t: math.cos((t / 1000 + 8e-3) / (1 + 8e-3) * math.pi / 2) ** 2
        first = 1 - f(1) / f(0)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(first, rel=1e-12)
    assert betas[-1].item() == pytest.approx(last, rel=1e-12)
    assert bool(((betas > 0) & (betas < 1)).all())
    acp = make_schedule(name).alphas_cumprod
    assert bool((acp[1:] < acp[:-1]).all())


def test_compvis_linear_is_squared_linspace_of_square_roots():
    expected = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert torch.equal(make_beta_schedule("linear", 1000, 0.00085, 0.012), expected)
    assert not torch.allclose(expected, torch.linspace(0.00085, 0.012, 1000, dtype=torch.float64))


def test_stable_diffusion_schedule_ends_at_known_alphas_cumprod(sched):
    assert sched.alphas_cumprod[-1].item() == pytest.approx(0.004660, abs=1e-6)


def test_buffers_are_the_12_compvis_names_in_order_as_float32():
    bufs = schedule_buffers(**SD)
    assert tuple(bufs) == BUFFER_NAMES and len(bufs) == 12
    assert all(b.dtype == torch.float32 and b.shape == (1000,) for b in bufs.values())


@pytest.mark.parametrize("t", [0, 1, 500, 999])
def test_buffers_match_textbook_formulas(sched, t):
    betas = sched.betas.tolist()
    acp = math.prod(1 - b for b in betas[: t + 1])
    acp_prev = math.prod(1 - b for b in betas[:t])
    b = betas[t]
    expected = {
        "alphas_cumprod": acp, "alphas_cumprod_prev": acp_prev, "sqrt_alphas_cumprod": acp ** 0.5,
        "sqrt_one_minus_alphas_cumprod": (1 - acp) ** 0.5, "log_one_minus_alphas_cumprod": math.log(1 - acp),
        "sqrt_recip_alphas_cumprod": acp ** -0.5, "sqrt_recipm1_alphas_cumprod": (1 / acp - 1) ** 0.5,
        "posterior_variance": b * (1 - acp_prev) / (1 - acp),
        "posterior_log_variance_clipped": math.log(max(b * (1 - acp_prev) / (1 - acp), 1e-20)),
        "posterior_mean_coef1": b * acp_prev ** 0.5 / (1 - acp),
        "posterior_mean_coef2": (1 - acp_prev) * (1 - b) ** 0.5 / (1 - acp),
    }
    for name, value in expected.items():
        assert getattr(sched, name)[t].item() == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_v_posterior_mixes_posterior_variance_towards_betas():
    s0, s1 = make_schedule(v_posterior=0.0), make_schedule(v_posterior=1.0)
    assert torch.allclose(s1.posterior_variance, s1.betas)
    mixed = make_schedule(v_posterior=0.3).posterior_variance
    assert torch.allclose(mixed, 0.7 * s0.posterior_variance + 0.3 * s0.betas)


def test_given_betas_override_and_are_validated():
    s = make_schedule("cosine", 5, given_betas=[0.1, 0.2, 0.3])
    assert s.num_timesteps == 3 and s.alphas_cumprod[-1].item() == pytest.approx(0.9 * 0.8 * 0.7)
    with pytest.raises(ValueError, match="given_betas.*\\(0, 1\\)"):
        make_schedule(given_betas=[0.1, 1.5])


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="unknown schedule 'cosin'.*cosine"):
        make_beta_schedule("cosin", 10)


def test_schedule_from_mapping_round_trip_and_missing_key(sched):
    back = DiffusionSchedule.from_mapping(sched.buffers(None))
    assert all(torch.equal(getattr(back, n), getattr(sched, n)) for n in BUFFER_NAMES)
    partial = dict(sched.buffers())
    del partial["posterior_mean_coef2"]
    with pytest.raises(KeyError, match="posterior_mean_coef2"):
        DiffusionSchedule.from_mapping(partial)
    with pytest.raises(ValueError, match="DiffusionSchedule.posterior_variance: expected a 1-D tensor"):
        DiffusionSchedule(**{**sched.buffers(), "posterior_variance": torch.zeros(1000, 1)})


# ---------------------------------------------------------------- gaussian

def test_extract_shape_values_and_checks(sched):
    t = torch.tensor([0, 999, 5])
    out = G.extract(sched.alphas_cumprod, t, (3, 4, 8, 8))
    assert out.shape == (3, 1, 1, 1) and out.device == t.device
    assert torch.equal(out.flatten(), sched.alphas_cumprod[t])
    with pytest.raises(ValueError, match="extract: t must be an integer tensor"):
        G.extract(sched.alphas_cumprod, t.float(), (3, 4))


def test_q_sample_moments(sched):
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([10, 300, 900]).repeat_interleave(100_000)  # (N,)
    x0 = torch.full((len(t), 1), 0.7, dtype=torch.float64)
    xt = G.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64), sched)
    for i, ti in enumerate([10, 300, 900]):
        chunk, acp = xt[i * 100_000:(i + 1) * 100_000], sched.alphas_cumprod[ti].item()
        se = ((1 - acp) / 100_000) ** 0.5
        assert abs(chunk.mean().item() - acp ** 0.5 * 0.7) < 5 * se
        assert chunk.var().item() == pytest.approx(1 - acp, rel=0.02)


def test_q_posterior_is_the_bayes_product_of_gaussians(sched):
    x0, xt = torch.tensor([[0.3], [-1.2]], dtype=torch.float64), torch.tensor([[0.9], [0.1]], dtype=torch.float64)
    for step in [1, 40, 700]:
        mean, var, log_var = G.q_posterior(x0, xt, torch.tensor([step, step]), sched)
        # prior x_{t-1} | x0 ~ N(sqrt(acp_prev) x0, 1 - acp_prev); likelihood x_t | x_{t-1} ~ N(sqrt(alpha) x_{t-1}, beta)
        acp_prev, beta = sched.alphas_cumprod[step - 1].item(), sched.betas[step].item()
        precision = 1 / (1 - acp_prev) + (1 - beta) / beta
        bayes_mean = (acp_prev ** 0.5 * x0 / (1 - acp_prev) + (1 - beta) ** 0.5 * xt / beta) / precision
        assert torch.allclose(mean, bayes_mean, rtol=1e-9)
        assert torch.allclose(var, torch.full_like(var, 1 / precision), rtol=1e-9)
        assert torch.allclose(log_var, var.log(), rtol=1e-9)


def test_q_posterior_at_t0_returns_x0_with_zero_variance(sched):
    x0, xt = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    mean, var, log_var = G.q_posterior(x0, xt, torch.tensor([0, 0]), sched)
    assert torch.allclose(mean, x0) and bool((var == 0).all()) and bool((log_var == math.log(1e-20)).all())


@pytest.mark.parametrize("t_value", [0, 250, 999])
def test_eps_x0_v_round_trips(sched, t_value):
    g = torch.Generator().manual_seed(1)
    x0, eps = (torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.full((4,), t_value)
    xt = G.q_sample(x0, t, eps, sched)
    v = G.get_v(x0, eps, t, sched)
    for got, want in [(G.predict_x0_from_eps(xt, t, eps, sched), x0), (G.predict_eps_from_x0(xt, t, x0, sched), eps),
                      (G.predict_x0_from_v(xt, t, v, sched), x0), (G.predict_eps_from_v(xt, t, v, sched), eps)]:
        assert torch.allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_target_converts_back_to_eps_and_x0(sched, parameterization):
    x0, eps = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([3, 400, 998])
    xt = G.q_sample(x0, t, eps, sched)
    out_eps, out_x0 = to_eps_x0(parameterization, target_for(parameterization, x0, eps, t, sched), xt, t, sched)
    assert torch.allclose(out_eps, eps, atol=1e-6) and torch.allclose(out_x0, x0, atol=1e-6)


def test_bad_parameterization_and_output_shape_are_named(sched):
    x, t = torch.zeros(2, 3), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="parameterization 'epsilon'.*'eps', 'x0', 'v'"):
        target_for("epsilon", x, x, t, sched)
    with pytest.raises(ValueError, match="model output shape \\(2, 4\\).*x_t shape \\(2, 3\\)"):
        to_eps_x0("eps", torch.zeros(2, 4), x, t, sched)


def test_float32_inputs_stay_float32_with_a_float64_schedule(sched):
    x0, eps, t = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([5, 6])
    assert sched.betas.dtype == torch.float64
    assert G.q_sample(x0, t, eps, sched).dtype == torch.float32
    assert all(o.dtype == torch.float32 for o in G.q_posterior(x0, eps, t, sched))
    assert G.q_sample(x0.double(), t, eps.double(), sched.to(dtype=torch.float32)).dtype == torch.float64


# ---------------------------------------------------------------- losses

def test_diffusion_loss_per_sample_closed_form():
    out, target = torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    assert torch.allclose(diffusion_loss(out, target, "l2"), torch.tensor([1.0, 4.0]))
    assert torch.allclose(diffusion_loss(out, -target, "l1"), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="loss_type 'huber'"):
        diffusion_loss(out, target, "huber")
    with pytest.raises(ValueError, match="differ in shape"):
        diffusion_loss(out, target[:, :, :1], "l2")


def test_lvlb_eps_weights_are_the_ddpm_formula(sched):
    w = lvlb_weights(sched, "eps")
    b, a, acp, var = sched.betas, 1 - sched.betas, sched.alphas_cumprod, sched.posterior_variance
    expected = b ** 2 / (2 * var * a * (1 - acp))
    assert torch.allclose(w[1:], expected[1:], rtol=1e-9) and w[0] == w[1]


def one_prediction_three_ways(sched, t: torch.Tensor, seed: int):
    """x0, x_t, the model's x0_hat and {parameterization: (prediction, target)} for one random eps prediction."""
    g = torch.Generator().manual_seed(seed)
    x0, eps, eps_hat = (torch.randn(len(t), 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    xt = G.q_sample(x0, t, eps, sched)
    x0_hat = G.predict_x0_from_eps(xt, t, eps_hat, sched)
    predictions = {"eps": (eps_hat, eps), "x0": (x0_hat, x0), "v": (G.get_v(x0_hat, eps_hat, t, sched),
                                                                     G.get_v(x0, eps, t, sched))}
    return x0, xt, x0_hat, predictions


def test_lvlb_term_is_the_posterior_kl_for_every_parameterization(sched):
    """w[t] * MSE(prediction) = |mu_tilde(x0) - mu_tilde(x0_hat)|^2 / (2 sigma_t^2), whatever is predicted."""
    t = torch.tensor([1, 200, 950])
    x0, xt, x0_hat, predictions = one_prediction_three_ways(sched, t, seed=2)
    mu, _, _ = G.q_posterior(x0, xt, t, sched)
    mu_hat, var, _ = G.q_posterior(x0_hat, xt, t, sched)
    kl = ((mu - mu_hat) ** 2 / (2 * var)).flatten(1).mean(1)  # (B,)
    for name, (pred, target) in predictions.items():
        weighted = lvlb_weights(sched, name)[t] * diffusion_loss(pred, target)
        assert torch.allclose(weighted, kl, rtol=1e-6), name


def test_training_loss_logvar_and_elbo_terms():
    out, target, t = torch.zeros(4, 3), torch.ones(4, 3), torch.tensor([0, 1, 2, 1])
    loss, logs = training_loss(out, target, t)
    assert loss.item() == pytest.approx(1.0) and set(logs) == {"loss_simple", "loss"}
    logvar = torch.tensor([0.0, 1.0, 2.0])
    loss, logs = training_loss(out, target, t, logvar=logvar, l_simple_weight=2.0)
    expected = sum(1 / math.exp(lv) + lv for lv in [0.0, 1.0, 2.0, 1.0]) / 4
    assert loss.item() == pytest.approx(2 * expected) and logs["loss_gamma"].item() == pytest.approx(expected)
    weights = torch.tensor([1.0, 10.0, 100.0])
    loss, logs = training_loss(out, target, t, original_elbo_weight=0.5, lvlb_weights=weights)
    assert logs["loss_vlb"].item() == pytest.approx(30.25) and loss.item() == pytest.approx(1 + 0.5 * 30.25)
    with pytest.raises(ValueError, match="original_elbo_weight != 0 needs lvlb_weights"):
        training_loss(out, target, t, original_elbo_weight=0.1)


def test_min_snr_weights_are_one_x0_space_weight_for_every_parameterization(sched):
    """w * MSE(prediction) = min(SNR, gamma) * MSE(x0 prediction), whatever the model predicts."""
    t = torch.tensor([1, 300, 990])
    x0, _, x0_hat, predictions = one_prediction_three_ways(sched, t, seed=3)
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    expected = snr.clamp(max=5.0) * diffusion_loss(x0_hat, x0)
    for name, (pred, target) in predictions.items():
        weighted = min_snr_weights(sched.alphas_cumprod, 5.0, name)[t] * diffusion_loss(pred, target)
        assert torch.allclose(weighted, expected, rtol=1e-6), name
    w = min_snr_weights(sched.alphas_cumprod, 5.0, "eps")
    assert w[-1] == 1.0 and w[0] < 0.01  # high noise: plain L_simple; low noise: capped
    with pytest.raises(ValueError, match="gamma must be > 0"):
        min_snr_weights(sched.alphas_cumprod, 0.0, "eps")


def test_training_loss_applies_snr_weights_but_logs_plain_loss_simple():
    out, target, t = torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([0, 1])
    loss, logs = training_loss(out, target, t, snr_weights=torch.tensor([0.5, 0.25]))
    assert loss.item() == pytest.approx(0.375) and logs["loss_simple"].item() == pytest.approx(1.0)


def test_training_loss_backpropagates_into_logvar():
    logvar = torch.zeros(5, requires_grad=True)
    out = torch.zeros(2, 3, requires_grad=True)
    training_loss(out, torch.full((2, 3), 2.0), torch.tensor([1, 3]), logvar=logvar)[0].backward()
    assert logvar.grad[[1, 3]].abs().min() > 0 and logvar.grad[[0, 2, 4]].abs().max() == 0
    assert out.grad is not None


# ---------------------------------------------------------------- timesteps

def test_sample_timesteps_uniform_and_reproducible():
    t = sample_timesteps(20_000, 10, generator=torch.Generator().manual_seed(3))
    assert t.dtype == torch.int64 and t.shape == (20_000,) and t.min() == 0 and t.max() == 9
    counts = torch.bincount(t, minlength=10).float()
    assert bool(((counts - 2000).abs() < 200).all())
    again = sample_timesteps(20_000, 10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t, again)


def test_ddim_timesteps_uniform_quad_and_errors():
    assert torch.equal(ddim_timesteps(1000, 50), torch.arange(50) * 20 + 1)
    assert len(ddim_timesteps(1000, 30)) == 30  # CompVis' range(0, T, T // steps) gives 31 here
    quad = ddim_timesteps(1000, 50, "quad")
    assert bool((quad[1:] > quad[:-1]).all()) and quad[0] == 1 and 800 <= quad[-1] <= 801
    with pytest.raises(ValueError, match="steps must be in \\[1, 100\\]"):
        ddim_timesteps(100, 101)
    with pytest.raises(ValueError, match="unknown discretize 'cubic'"):
        ddim_timesteps(100, 10, "cubic")


def test_sampling_timesteps_descend_and_start_at_start_t():
    assert sampling_timesteps(1000, 10).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert sampling_timesteps(1000, 10, start_t=450).tolist() == [450, 401, 301, 201, 101, 1]
    assert sampling_timesteps(1000, 10, start_t=401).tolist() == [401, 301, 201, 101, 1]
    with pytest.raises(ValueError, match="start_t must be in \\[0, 999\\]"):
        sampling_timesteps(1000, 10, start_t=1000)


# ---------------------------------------------------------------- no hard-coded devices

def test_no_hard_coded_cuda_in_diffusion_package():
    root = pathlib.Path(__file__).resolve().parents[1] / "ldm" / "diffusion"
    files = sorted(root.rglob("*.py"))
    assert len(files) >= 9
    pattern = re.compile(r"\.cuda\(|[\"']cuda(:\d+)?[\"']")
    offenders = [f"{f.name}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert offenders == []

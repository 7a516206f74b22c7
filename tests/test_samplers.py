"""Samplers on analytic Gaussian data (the exact denoiser is known in closed form) and guidance."""
import pytest
import torch

from ldm.diffusion import gaussian as G
from ldm.diffusion.guidance import CFGDenoiser
from ldm.diffusion.parameterization import to_eps_x0
from ldm.diffusion.samplers import ddim_step, sample_ddim, sample_ddpm, sample_plms
from ldm.diffusion.schedules import make_schedule
from ldm.diffusion.timesteps import sampling_timesteps

F64 = torch.float64
MEAN_1D, COV_1D = [1.5], [[0.25]]  # data N(1.5, 0.5^2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of tiny element-wise ops: extra threads only add contention on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cosine():
    return make_schedule("cosine", 1000)


def gaussian_model(schedule, mean, cov, parameterization="eps", calls=None):
    """The exact denoiser for data N(mean, cov): E[eps | x_t] = b (a^2 cov + b^2 I)^-1 (x_t - a mean)."""
    mean, cov = torch.tensor(mean, dtype=F64), torch.tensor(cov, dtype=F64)

    def model(x, t):
        if calls is not None:
            calls.append((x.clone(), t.clone()))
        acp = schedule.alphas_cumprod[t[0]].item()
        a, b = acp ** 0.5, (1 - acp) ** 0.5
        gain = torch.linalg.inv(acp * cov + (1 - acp) * torch.eye(len(mean), dtype=F64)).to(x)  # (D, D)
        centred = x - a * mean.to(x)  # (N, D)
        eps = b * centred @ gain
        x0 = mean.to(x) + a * centred @ gain @ cov.to(x)
        return {"eps": eps, "x0": x0, "v": a * eps - b * x0}[parameterization]
    return model


def exact_start(schedule, t, n, mean, cov, seed):
    """n samples of the true marginal q(x_t), whitened so their sample mean and covariance are exact."""
    mean, cov = torch.tensor(mean, dtype=F64), torch.tensor(cov, dtype=F64)
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=F64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / n)).T
    acp = schedule.alphas_cumprod[t].item()
    marginal = acp * cov + (1 - acp) * torch.eye(len(mean), dtype=F64)
    return acp ** 0.5 * mean + z @ torch.linalg.cholesky(marginal).T  # (n, D)


def errors(x, mean, cov):
    """(max |mean error|, max |cov error| / max |cov|) of the samples x [N, D]."""
    mean, cov = torch.tensor(mean, dtype=F64), torch.tensor(cov, dtype=F64)
    m = x.mean(0)
    c = (x - m).T @ (x - m) / len(x)
    return (m - mean).abs().max().item(), ((c - cov).abs().max() / cov.abs().max()).item()


def run(sampler, schedule, steps, n, seed=0, mean=MEAN_1D, cov=COV_1D, **kw):
    t0 = sampling_timesteps(schedule.num_timesteps, steps)[0].item()
    x = exact_start(schedule, t0, n, mean, cov, seed)
    g = torch.Generator().manual_seed(seed + 100)
    return sampler(gaussian_model(schedule, mean, cov), x, schedule, steps, generator=g, **kw)


# ---------------------------------------------------------------- analytic Gaussian data

@pytest.mark.parametrize("sampler, kw, bounds", [
    (sample_ddim, {"eta": 0.0}, (0.3, 0.07, 0.015)),
    (sample_plms, {}, (0.02, 0.002, 1e-4)),
])
def test_deterministic_samplers_reproduce_gaussian_data(cosine, sampler, kw, bounds):
    """Deterministic and linear in x_T: from an exactly whitened start only discretisation error is left."""
    errs = []
    for steps, bound in zip((10, 50, 250), bounds):
        mean_err, var_err = errors(run(sampler, cosine, steps, 2000, **kw), MEAN_1D, COV_1D)
        assert mean_err < 1e-9 and var_err < bound, (steps, var_err)
        errs.append(var_err)
    assert errs[0] > errs[1] > errs[2]


def test_ddim_eta1_reproduces_gaussian_data(cosine):
    errs = []
    for steps, bound in zip((10, 50, 250), (0.45, 0.16, 0.05)):  # Monte Carlo s.e. of var: 0.5%
        mean_err, var_err = errors(run(sample_ddim, cosine, steps, 100_000, eta=1.0), MEAN_1D, COV_1D)
        assert mean_err < 0.008 and var_err < bound, (steps, mean_err, var_err)
        errs.append(var_err)
    assert errs[0] > errs[1] > errs[2]


def test_ddpm_reproduces_gaussian_data_better_with_more_timesteps():
    errs = []
    for T, bound in ((20, 0.3), (200, 0.06)):
        schedule = make_schedule("cosine", T)
        x = exact_start(schedule, T - 1, 100_000, MEAN_1D, COV_1D, seed=1)
        out = sample_ddpm(gaussian_model(schedule, MEAN_1D, COV_1D), x, schedule,
                          generator=torch.Generator().manual_seed(2))
        mean_err, var_err = errors(out, MEAN_1D, COV_1D)
        assert mean_err < 0.008 and var_err < bound, (T, mean_err, var_err)
        errs.append(var_err)
    assert errs[0] > errs[1]


def test_plms_reproduces_correlated_2d_gaussian(cosine):
    mean, cov = [1.0, -2.0], [[0.25, 0.2], [0.2, 0.5]]
    mean_err, cov_err = errors(run(sample_plms, cosine, 50, 2000, mean=mean, cov=cov), mean, cov)
    assert mean_err < 1e-9 and cov_err < 0.003


@pytest.mark.parametrize("parameterization", ["x0", "v"])
@pytest.mark.parametrize("sampler, kw", [(sample_ddpm, {}), (sample_ddim, {"steps": 20, "eta": 0.5}),
                                         (sample_plms, {"steps": 20})])
def test_samplers_are_parameterization_agnostic(cosine, parameterization, sampler, kw):
    schedule = make_schedule("cosine", 50) if sampler is sample_ddpm else cosine
    x = torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    outs = [sampler(gaussian_model(schedule, MEAN_1D, COV_1D, p), x, schedule, parameterization=p,
                    generator=torch.Generator().manual_seed(1), **kw) for p in ("eps", parameterization)]
    assert torch.allclose(outs[0], outs[1], atol=1e-8)


def test_ddpm_is_algorithm_2_of_ddpm_paper():
    """x_{t-1} = (x_t - beta_t / sqrt(1 - acp_t) eps) / sqrt(alpha_t) + sigma_t z with sigma_t^2 = beta-tilde."""
    schedule = make_schedule("linear", 20, 1e-3, 0.2)
    model = lambda x, t: torch.tanh(x) * (1 + t.view(-1, 1, 1) / 20)  # any nonlinear eps-model
    x_T = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = sample_ddpm(model, x_T, schedule, generator=torch.Generator().manual_seed(1))
    g, x = torch.Generator().manual_seed(1), x_T
    for t in range(19, -1, -1):
        beta, acp = schedule.betas[t].item(), schedule.alphas_cumprod[t].item()
        eps = model(x, torch.full((3,), t))
        x = (x - beta / (1 - acp) ** 0.5 * eps) / (1 - beta) ** 0.5
        if t > 0:
            x = x + schedule.posterior_variance[t].item() ** 0.5 * torch.randn(x.shape, generator=g, dtype=F64)
    assert torch.allclose(out, x, atol=1e-10)


def test_plms_is_heun_bootstrap_then_adams_bashforth():
    schedule = make_schedule("linear", 100, 1e-3, 0.05)
    model = lambda x, t: torch.sin(x) * (1 + t.view(-1, 1) / 100)  # any nonlinear eps-model
    x_T = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = sample_plms(model, x_T, schedule, steps=5)
    ts = [81, 61, 41, 21, 1]
    acp = [schedule.alphas_cumprod[t].item() for t in ts] + [1.0]

    def ddim(x, e, a, a_prev):  # DDIM eq. 12, eta = 0
        return a_prev ** 0.5 * (x - (1 - a) ** 0.5 * e) / a ** 0.5 + (1 - a_prev) ** 0.5 * e
    eps = lambda x, t: model(x, torch.full((3,), t))
    x, history = x_T, []
    ab = {1: [3 / 2, -1 / 2], 2: [23 / 12, -16 / 12, 5 / 12], 3: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    for i, t in enumerate(ts):
        e = eps(x, t)
        if i == 0:
            e_prime = (e + eps(ddim(x, e, acp[0], acp[1]), ts[1])) / 2
        else:
            past = [e] + history[::-1][:3]
            e_prime = sum(c * p for c, p in zip(ab[len(past) - 1], past))
        history.append(e)
        x = ddim(x, e_prime, acp[i], acp[i + 1])
    assert torch.allclose(out, x, atol=1e-10)


def test_ddim_step_with_eta_1_between_neighbours_is_the_ddpm_posterior():
    schedule = make_schedule("linear", 100)
    x0, eps = torch.randn(5, 3, dtype=F64), torch.randn(5, 3, dtype=F64)
    t = 40
    x_t = G.q_sample(x0, torch.full((5,), t), eps, schedule)
    acp = schedule.alphas_cumprod
    out = ddim_step(eps, x0, acp[t].item(), acp[t - 1].item(), eta=1.0, generator=torch.Generator().manual_seed(4))
    mean, var, _ = G.q_posterior(x0, x_t, torch.full((5,), t), schedule)
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert torch.allclose(out, mean + var.sqrt() * z, atol=1e-12)


# ---------------------------------------------------------------- reproducibility, dtype, logging

@pytest.mark.parametrize("sampler, kw", [(sample_ddpm, {}), (sample_ddim, {"steps": 10, "eta": 1.0}),
                                         (sample_plms, {"steps": 10})])
def test_same_seed_same_output(sampler, kw):
    schedule = make_schedule("linear", 100)
    model = lambda x, t: 0.5 * x
    a, b, c = (sampler(model, (2, 3, 4, 4), schedule, generator=torch.Generator().manual_seed(s), **kw)
               for s in (7, 7, 8))
    assert a.shape == (2, 3, 4, 4) and torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("sampler, kw", [(sample_ddpm, {}), (sample_ddim, {"steps": 10, "eta": 1.0}),
                                         (sample_plms, {"steps": 10})])
@pytest.mark.parametrize("x_dtype, schedule_dtype", [(torch.float64, torch.float32), (torch.float32, F64)])
def test_samplers_run_in_the_dtype_of_x_T(sampler, kw, x_dtype, schedule_dtype):
    schedule = make_schedule("linear", 50).to(dtype=schedule_dtype)
    seen = []

    def model(x, t):
        seen.append(x.dtype)
        return 0.5 * x
    out = sampler(model, torch.randn(2, 3, dtype=x_dtype), schedule,
                  generator=torch.Generator().manual_seed(0), **kw)
    assert out.dtype == x_dtype and set(seen) == {x_dtype}


@pytest.mark.parametrize("sampler, kw, n_calls", [
    (sample_ddpm, {"start_t": 29}, 30), (sample_ddim, {"steps": 10}, 10), (sample_plms, {"steps": 10}, 11)])
def test_callback_intermediates_and_number_of_model_calls(cosine, sampler, kw, n_calls):
    calls, steps_seen = [], []
    model = gaussian_model(cosine, MEAN_1D, COV_1D, calls=calls)
    out, inter = sampler(model, torch.randn(8, 1, dtype=F64), cosine, return_intermediates=True,
                         callback=lambda i, x, x0: steps_seen.append((i, x.shape, x0.shape)), **kw)
    n_steps = n_calls - 1 if sampler is sample_plms else n_calls  # PLMS' first step calls twice
    assert len(calls) == n_calls
    assert steps_seen == [(i, (8, 1), (8, 1)) for i in range(n_steps)]
    assert 1 < len(inter) <= 10 and torch.allclose(inter[-1], out)  # the last step lands on x0_pred


def test_progress_bar_only_when_asked(capsys):
    schedule = make_schedule("linear", 20)
    sample_ddim(lambda x, t: x, torch.zeros(1, 2), schedule, steps=5)
    assert "DDIM" not in capsys.readouterr().err
    sample_ddim(lambda x, t: x, torch.zeros(1, 2), schedule, steps=5, progress=True)
    assert "DDIM" in capsys.readouterr().err


# ---------------------------------------------------------------- img2img and inpainting

@pytest.mark.parametrize("sampler", [sample_ddim, sample_plms])
def test_img2img_start_t_starts_there_and_still_reproduces_the_data(cosine, sampler):
    calls = []
    x = exact_start(cosine, 600, 2000, MEAN_1D, COV_1D, seed=3)
    out = sampler(gaussian_model(cosine, MEAN_1D, COV_1D, calls=calls), x, cosine, steps=100, start_t=600)
    assert calls[0][1][0].item() == 600 and bool((calls[1][1] < 600).all())
    mean_err, var_err = errors(out, MEAN_1D, COV_1D)
    assert mean_err < 1e-9 and var_err < 0.03


def test_ddpm_start_t(cosine):
    calls = []
    sample_ddpm(gaussian_model(cosine, MEAN_1D, COV_1D, calls=calls), torch.zeros(4, 1, dtype=F64), cosine,
                start_t=9)
    assert [c[1][0].item() for c in calls] == list(range(9, -1, -1))


@pytest.mark.parametrize("sampler", [sample_ddpm, sample_ddim, sample_plms])
def test_inpainting_keeps_the_known_region(sampler):
    """Element-wise model: the unknown half evolves as without a mask, the known half ends as x0."""
    schedule = make_schedule("cosine", 100)
    calls = []
    model = gaussian_model(schedule, MEAN_1D, COV_1D, calls=calls)
    shaped = lambda x, t: model(x.reshape(-1, 1), t.repeat_interleave(x[0].numel())).reshape(x.shape)
    x_T, x0 = torch.randn(2000, 2, dtype=F64), torch.full((2000, 2), -3.0, dtype=F64)
    mask = torch.tensor([1.0, 0.0], dtype=F64)  # dim 0 known
    kw = {} if sampler is sample_ddpm else {"steps": 20}
    plain = sampler(shaped, x_T, schedule, generator=torch.Generator().manual_seed(0), **kw)
    calls.clear()
    out = sampler(shaped, x_T, schedule, mask=mask, x0=x0, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(out[:, 0], x0[:, 0])
    if sampler is not sample_ddpm:  # deterministic: the unknown half is untouched by the blend
        assert torch.allclose(out[:, 1], plain[:, 1], atol=1e-12)
    known_in, t = calls[0][0].reshape(2000, 2)[:, 0], calls[0][1][0].item()
    acp = schedule.alphas_cumprod[t].item()
    z = (known_in - acp ** 0.5 * -3.0) / (1 - acp) ** 0.5  # q_sample(x0, t) noise
    assert abs(z.mean().item()) < 0.1 and z.std().item() == pytest.approx(1.0, abs=0.06)


def test_sampler_input_errors_are_clear(cosine):
    model, x = (lambda x, t: x), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="needs both `mask`.*and `x0`"):
        sample_ddim(model, x, cosine, steps=5, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="start_t must be in \\[0, 999\\]"):
        sample_ddpm(model, x, cosine, start_t=1000)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        sample_ddim(model, x, cosine, eta=-1.0)
    with pytest.raises(ValueError, match="model output shape \\(2, 1\\)"):
        sample_plms(lambda x, t: x[:, :1], x, cosine, steps=5)
    with pytest.raises(ValueError, match="parameterization 'eps_'"):
        sample_ddpm(model, x, cosine, parameterization="eps_")


# ---------------------------------------------------------------- classifier-free guidance

class CountingModel:
    """eps = x * w(cond) + t / 1000, with w read from a tensor, dict or list condition; counts calls."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, c):
        self.batches.append(x.shape[0])
        if isinstance(c, dict):
            c = c["c_crossattn"][0].mean(dim=(1, 2)) + c["c_concat"][0].mean(dim=(1, 2, 3))
        return x * c.view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000


def test_cfg_scale_1_and_0_are_the_conditional_and_unconditional_models():
    model, x, t = CountingModel(), torch.randn(3, 2, 4, 4), torch.tensor([5, 6, 7])
    c, uc = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3)
    assert torch.equal(CFGDenoiser(model, 1.0, {"c": uc})(x, t, c=c), model(x, t, c=c))
    assert torch.equal(CFGDenoiser(model, 0.0, {"c": uc})(x, t, c=c), model(x, t, c=uc))


def test_cfg_is_one_batched_forward_with_the_guidance_formula():
    model, x, t = CountingModel(), torch.randn(3, 2, 4, 4), torch.tensor([5, 6, 7])
    c, uc = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5])  # batch-1 uncond is expanded
    out = CFGDenoiser(model, 7.5, {"c": uc})(x, t, c=c)
    assert model.batches == [6]
    e_u, e_c = model(x, t, c=uc.expand(3)), model(x, t, c=c)
    assert torch.allclose(out, e_u + 7.5 * (e_c - e_u), atol=1e-5)


def test_cfg_concatenates_dict_and_list_conditions_per_key():
    model, x, t = CountingModel(), torch.randn(2, 1, 2, 2), torch.tensor([1, 2])
    cond = {"c_concat": [torch.ones(2, 1, 2, 2)], "c_crossattn": [torch.full((2, 3, 4), 2.0)]}
    uncond = {"c_concat": [torch.ones(2, 1, 2, 2)], "c_crossattn": [torch.zeros(1, 3, 4)]}
    out = CFGDenoiser(model, 3.0, {"c": uncond})(x, t, c=cond)
    expected = x * (1 + 3.0 * 2.0) + t.view(-1, 1, 1, 1) / 1000
    assert model.batches == [4] and torch.allclose(out, expected, atol=1e-6)
    with pytest.raises(ValueError, match="cond\\['c'\\] keys \\['c_concat', 'c_crossattn'\\] differ"):
        CFGDenoiser(model, 3.0, {"c": {"c_crossattn": [torch.zeros(1, 3, 4)]}})(x, t, c=cond)
    with pytest.raises(ValueError, match="cond keys \\['c'\\] differ from uncond's \\['y'\\]"):
        CFGDenoiser(model, 3.0, {"y": torch.zeros(2)})(x, t, c=torch.ones(2))


def test_guiding_v_or_x0_outputs_equals_guiding_eps(cosine):
    """The eps/x0/v maps are affine at fixed (x_t, t), so guidance commutes with them."""
    x, t = torch.randn(4, 3, dtype=F64), torch.tensor([10, 300, 300, 900])
    cond, uncond = torch.tensor([[1.0, 0.0, -2.0]], dtype=F64), torch.zeros(1, 3, dtype=F64)
    for parameterization in ("x0", "v"):
        def model(x, t, m, p=parameterization):  # exact denoiser of data N(m, I): eps = b (x - a m)
            acp = G.extract(cosine.alphas_cumprod, t, x.shape)
            a, b = acp.sqrt(), (1 - acp).sqrt()
            eps, x0 = b * (x - a * m), m + a * (x - a * m)
            return {"x0": x0, "v": a * eps - b * x0}[p]
        guided = CFGDenoiser(model, 4.0, {"m": uncond})(x, t, m=cond.expand(4, 3))
        eps_u = to_eps_x0(parameterization, model(x, t, uncond), x, t, cosine)[0]
        eps_c = to_eps_x0(parameterization, model(x, t, cond), x, t, cosine)[0]
        eps_guided = to_eps_x0(parameterization, guided, x, t, cosine)[0]
        assert torch.allclose(eps_guided, eps_u + 4.0 * (eps_c - eps_u), atol=1e-9)


def test_cfg_denoiser_drives_a_sampler_with_one_call_per_step():
    model = CountingModel()
    guided = CFGDenoiser(model, 2.0, {"c": torch.zeros(1)})
    out = sample_ddim(guided, torch.randn(2, 1, 2, 2), make_schedule("linear", 100), steps=8,
                      extra_args={"c": torch.tensor([0.1, 0.2])})
    assert model.batches == [4] * 8 and out.shape == (2, 1, 2, 2) and torch.isfinite(out).all()


def test_gaussian_model_is_the_posterior_mean_of_eps(cosine):
    """Sanity check of the test's own oracle: regress eps on x_t by Monte Carlo at one timestep."""
    g = torch.Generator().manual_seed(5)
    x0 = 1.5 + 0.5 * torch.randn(200_000, 1, generator=g, dtype=F64)
    eps = torch.randn(200_000, 1, generator=g, dtype=F64)
    t = torch.full((200_000,), 400)
    xt = G.q_sample(x0, t, eps, cosine)
    slope = lambda y: (((xt - xt.mean()) * (y - y.mean())).mean() / xt.var()).item()
    pred = gaussian_model(cosine, MEAN_1D, COV_1D)(xt, t)
    assert slope(pred) == pytest.approx(slope(eps), rel=0.02)
    assert abs(pred.mean().item() - eps.mean().item()) < 0.01

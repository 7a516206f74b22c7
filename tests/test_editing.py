"""img2img (strength) and blended inpainting through run_sampler, for every sampler, on the exact denoiser of a
Gaussian mixture (element-wise in 1-D, so masked dimensions can be compared with unmasked runs)."""
import pytest
import torch

from ldm.diffusion import editing
from ldm.diffusion.denoiser import DiscreteDenoiser
from ldm.diffusion.gaussian import q_sample
from ldm.diffusion.samplers import sample_ddim
from ldm.diffusion.sampling import SAMPLERS, SIGMA_SAMPLERS, STOCHASTIC_SIGMA_SAMPLERS, run_sampler
from ldm.diffusion.schedules import make_schedule
from ldm.diffusion.sigma_schedules import make_sigmas
from tests.gaussian_mixture import F64, Mixture, discrete_model
from tests.test_samplers import one_thread  # noqa: F401 - autouse fixture

MIX = Mixture([0.3, 0.7], [[-1.0], [1.5]], [0.3, 0.4])
SCHEDULE = make_schedule("linear", 200, 5e-4, 0.1)


def elementwise(parameterization="eps"):
    """The 1-D mixture network applied to every element of an (N, D) tensor independently."""
    inner = discrete_model(MIX, SCHEDULE, parameterization)
    return lambda x, t: inner(x.reshape(-1, 1), t.repeat_interleave(x[0].numel())).reshape(x.shape)


def schedule_of(sampler):
    return "uniform" if sampler in ("ddpm", "ddim", "plms") else "karras"


def run(sampler, x_T, seed=0, **kw):
    return run_sampler(elementwise(), x_T, SCHEDULE, "eps", sampler, steps=10, sigma_schedule=schedule_of(sampler),
                       generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("sampler", sorted(SIGMA_SAMPLERS))
def test_img2img_at_strength_1_is_plain_sampling_from_the_noised_start(sampler):
    init, noise = torch.randn(8, 3, dtype=F64), torch.randn(8, 3, dtype=F64)
    denoiser = DiscreteDenoiser(elementwise(), SCHEDULE, "eps")
    sigmas = make_sigmas("karras", 10, denoiser.log_sigmas)
    expected = SIGMA_SAMPLERS[sampler](denoiser, init + sigmas[0] * noise, sigmas,
                                       generator=torch.Generator().manual_seed(0))
    assert torch.allclose(run(sampler, noise, init=init, strength=1.0), expected, atol=1e-12)


def test_ddim_img2img_at_strength_1_starts_at_the_top_timestep_of_its_sub_sequence():
    init, noise = torch.randn(8, 3, dtype=F64), torch.randn(8, 3, dtype=F64)
    t_top = editing.discrete_start_t("ddim", 1.0, 10, 200)
    assert t_top == 181  # 1 + 9 * (200 // 10)
    x_T = q_sample(init, torch.full((8,), t_top), noise, SCHEDULE)
    assert torch.allclose(run("ddim", noise, init=init, strength=1.0), sample_ddim(elementwise(), x_T, SCHEDULE, 10),
                          atol=1e-12)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_strength_towards_0_keeps_the_image(sampler):
    init = MIX.sample(500, torch.Generator().manual_seed(1))       # (500, 1) data points
    noise = torch.randn(500, 1, generator=torch.Generator().manual_seed(2), dtype=F64)
    change = [(run(sampler, noise, init=init, strength=s) - init).abs().mean().item() for s in (0.8, 0.3, 0.002)]
    # the last starts at the grid's first timesteps (sigma 0.02-0.03): it only removes that much noise
    assert change[0] > change[1] > 5 * change[2] and change[2] < 0.03, change


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inpainting_keeps_the_known_part_exactly_and_fills_the_rest(sampler):
    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    x0 = torch.full((2000, 2), -3.0, dtype=F64)                    # far from the data: visible if it leaks
    mask = torch.tensor([1.0, 0.0], dtype=F64)                      # dimension 0 known
    plain = run(sampler, x_T)
    out = run(sampler, x_T, mask=mask, x0=x0)
    assert torch.equal(out[:, 0], x0[:, 0])
    if sampler not in STOCHASTIC_SIGMA_SAMPLERS + ("ddpm",):  # deterministic: the unknown part is untouched
        assert torch.allclose(out[:, 1], plain[:, 1], atol=1e-10)
    assert abs(out[:, 1].mean().item() - MIX.mean.item()) < 0.15   # the filled part is data, not the known value


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "unipc"])
def test_known_region_follows_its_noise_path_under_sigma_samplers(sampler):
    """D = x0 there, and every sampler is exact for a constant D: x = x0 + sigma_i z along the whole run."""
    x_T, x0 = torch.randn(16, 2, dtype=F64), torch.randn(16, 2, dtype=F64)
    mask = torch.tensor([1.0, 0.0], dtype=F64)
    sigmas = make_sigmas("karras", 10, DiscreteDenoiser(elementwise(), SCHEDULE).log_sigmas)
    seen = []
    run(sampler, x_T, mask=mask, x0=x0, callback=lambda i, x, d: seen.append(x[:, 0].clone()))
    for i, x in enumerate(seen):
        assert torch.allclose(x, x0[:, 0] + sigmas[i + 1].item() * x_T[:, 0], atol=1e-10), i


def test_img2img_with_a_mask_defaults_the_known_content_to_init():
    init, noise = torch.randn(8, 2, dtype=F64), torch.randn(8, 2, dtype=F64)
    mask = torch.tensor([0.0, 1.0], dtype=F64)
    out = run("dpmpp_2m", noise, init=init, strength=0.5, mask=mask)
    assert torch.equal(out[:, 1], init[:, 1]) and not torch.allclose(out[:, 0], init[:, 0])


def test_strength_to_steps_and_start_timesteps():
    assert editing.strength_steps(1.0, 20) == 20 and editing.strength_steps(0.5, 20) == 10
    assert editing.strength_steps(0.01, 20) == 1
    assert editing.discrete_start_t("ddim", 0.5, 10, 1000) == 401     # the 5th of 1, 101, ..., 901
    assert editing.discrete_start_t("ddpm", 0.5, 10, 1000) == 499
    assert editing.discrete_start_t("ddpm", 1.0, 10, 1000) == 999


def test_known_mask_at_a_smaller_size_is_known_only_where_every_pixel_is():
    mask = torch.ones(1, 1, 4, 4)
    mask[..., 0, 0] = 0                                             # one unknown pixel in the top-left 2x2 block
    assert editing.known_mask_at(mask, (2, 2)).flatten().tolist() == [0.0, 1.0, 1.0, 1.0]


def test_editing_input_errors_are_clear():
    x = torch.zeros(2, 1, dtype=F64)
    for strength in (0.0, 1.5):
        with pytest.raises(ValueError, match="strength must be in \\(0, 1\\]"):
            run("euler", x, init=x, strength=strength)
    with pytest.raises(ValueError, match="needs both `init`.*and `strength`"):
        run("euler", x, init=x)
    with pytest.raises(ValueError, match="init shape \\(2, 2\\) differs"):
        run("heun", x, init=torch.zeros(2, 2, dtype=F64), strength=0.5)
    with pytest.raises(ValueError, match="inpainting needs both `mask`"):
        run("unipc", x, mask=torch.ones(1, dtype=F64))
    with pytest.raises(ValueError, match="start_t is for the discrete samplers"):
        run("euler", x, start_t=10)

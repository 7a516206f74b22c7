"""Pixel-space DDPM module: CompVis keys, training step, EMA, samplers, LR schedules, checkpoints, DiffusionWrapper,
and a tiny model that learns a two-colour data set."""
import pytest
import torch
import torch.nn as nn

from ldm.diffusion import BUFFER_NAMES, schedule_buffers
from ldm.models.ddpm import DDPM, linear_cycle_schedule
from ldm.models.diffusion_wrapper import DiffusionWrapper
from ldm.modules.ema import LitEma
from ldm.util import ConfigError, instantiate_from_config

UNET = "ldm.modules.diffusionmodules.unet.UNetModel"


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread, and do not slow to a crawl when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unet_config(size: int = 8, channels: int = 3, **kw) -> dict:
    params = dict(image_size=size, in_channels=channels, out_channels=channels, model_channels=32,
                  channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2], num_head_channels=32)
    return {"target": UNET, "params": params | kw}


def make_ddpm(seed: int = 0, **kw) -> DDPM:
    torch.manual_seed(seed)
    params = dict(unet_config=unet_config(), timesteps=50, image_size=8, channels=3, log_every_t=10) | kw
    return DDPM(**params)


def images(n: int = 4, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def randomize_zero_layers(model: DDPM) -> DDPM:
    """Give the U-Net's zero-initialised output layers random weights (and the EMA copy the same), so that the
    denoiser output depends on its input and conditions."""
    with torch.no_grad():
        for p in model.model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    if model.use_ema:
        model.model_ema = LitEma(model.model)
    return model


# ---- construction and checkpoint layout -------------------------------------------------------------------------
def test_builds_from_config_with_compvis_key_layout():
    model = instantiate_from_config({"target": "ldm.models.ddpm.DDPM",
                                     "params": {"unet_config": unet_config(), "timesteps": 50, "image_size": 8}})
    sd = model.state_dict()
    top = {k for k in sd if "." not in k}
    assert top == set(BUFFER_NAMES)  # exactly the 12 schedule buffers, no logvar / lvlb_weights
    assert {k.split(".")[0] for k in sd if "." in k} == {"model", "model_ema"}
    assert all(k.startswith("model.diffusion_model.") for k in sd if k.startswith("model."))
    assert "model_ema.diffusion_modelinput_blocks00weight" in sd and "model_ema.num_updates" in sd
    expected = schedule_buffers(timesteps=50)
    for name in BUFFER_NAMES:
        assert sd[name].dtype == torch.float32 and torch.equal(sd[name], expected[name])


def test_learn_logvar_is_a_trained_key_and_elbo_weights_are_not_saved():
    model = make_ddpm(learn_logvar=True, logvar_init=0.5, original_elbo_weight=1e-3)
    sd = model.state_dict()
    assert "logvar" in sd and "lvlb_weights" not in sd
    loss = model.training_step({"image": images()}, 0)
    loss.backward()
    assert model.logvar.grad is not None and model.logvar.grad.abs().sum() > 0
    assert any(p is model.logvar for p in model.trainable_parameters())


@pytest.mark.parametrize("key,value,match", [
    ("parameterization", "score", "parameterization"), ("loss_type", "huber", "loss_type"),
    ("use_positional_encodings", True, "use_positional_encodings"), ("conditioning_key", "crossattn", "unconditional"),
    ("beta_schedule", "quadratic", "beta_schedule"),
])
def test_unsupported_values_are_config_errors_naming_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        make_ddpm(**{key: value})


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match="timestep .*did you mean 'timesteps'"):
        instantiate_from_config({"target": "ldm.models.ddpm.DDPM",
                                 "params": {"unet_config": unet_config(), "timestep": 50}})


# ---- training -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_training_step_gives_finite_loss_and_unet_gradients(parameterization):
    model = make_ddpm(parameterization=parameterization)
    loss = model.training_step({"image": images()}, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.model.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_p_losses_matches_closed_form():
    model = make_ddpm()
    x0, t, noise = images(), torch.tensor([0, 10, 25, 49]), torch.randn(4, 3, 8, 8)
    loss, logs = model.p_losses(x0, {}, t, noise)
    a = model.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    b = model.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = (model.model(a * x0 + b * noise, t) - noise).pow(2).mean()
    assert torch.allclose(loss, expected, atol=1e-6) and torch.allclose(logs["loss_simple"], expected, atol=1e-6)


def test_snr_gamma_weights_the_loss_per_timestep_and_is_not_saved():
    model = make_ddpm(snr_gamma=5.0)
    x0, t, noise = images(), torch.tensor([0, 10, 25, 49]), torch.randn(4, 3, 8, 8)
    loss, logs = model.p_losses(x0, {}, t, noise)
    a = model.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    b = model.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    per_sample = (model.model(a * x0 + b * noise, t) - noise).pow(2).flatten(1).mean(1)
    snr = model.alphas_cumprod[t] / (1 - model.alphas_cumprod[t])
    assert torch.allclose(loss, (snr.clamp(max=5.0) / snr * per_sample).mean(), atol=1e-6)
    assert torch.allclose(logs["loss_simple"], per_sample.mean(), atol=1e-6)
    assert "snr_weights" not in model.state_dict()
    with pytest.raises(ConfigError, match="snr_gamma"):
        make_ddpm(snr_gamma=0.0)


def test_ema_update_and_scope_swap_and_restore_weights():
    model = make_ddpm(ema_decay=0.9)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    def closure(i: int) -> torch.Tensor:  # what Lightning hands to optimizer_step: training_step and backward
        opt.zero_grad()
        loss = model.training_step({"image": images(seed=i)}, i)
        loss.backward()
        return loss

    for i in range(3):
        model.optimizer_step(0, i, opt, lambda: closure(i))  # the optimizer step, then the EMA update
    assert int(model.model_ema.num_updates) == 3
    trained = {k: v.clone() for k, v in model.model.named_parameters()}
    shadow = dict(model.model_ema.named_buffers())
    with model.ema_scope():
        with model.ema_scope():  # re-entrant
            for name, p in model.model.named_parameters():
                assert torch.equal(p, shadow[name.replace(".", "")])
        assert not torch.equal(model.model.diffusion_model.out[2].weight, trained["diffusion_model.out.2.weight"])
    for name, p in model.model.named_parameters():
        assert torch.equal(p, trained[name])


def test_optimizer_and_lr_warmup():
    model = make_ddpm(lr_warmup_steps=4, weight_decay=0.05)
    model.learning_rate = 1e-3
    conf = model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.05
    assert conf["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert isinstance(make_ddpm().configure_optimizers(), torch.optim.AdamW)  # no warm-up: no scheduler


def test_compvis_lambda_linear_scheduler_config_is_read_without_its_module():
    config = {"target": "ldm.lr_scheduler.LambdaLinearScheduler",
              "params": {"warm_up_steps": [10], "cycle_lengths": [100], "f_start": [1e-6], "f_max": [1.0],
                         "f_min": [0.5]}}
    model = make_ddpm(scheduler_config=config)
    assert [model.lr_multiplier(s) for s in (0, 5, 10, 55, 100)] == pytest.approx([1e-6, 0.5, 0.95, 0.725, 0.5], abs=1e-5)
    two = linear_cycle_schedule([2, 2], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [4, 4])
    assert [two(s) for s in range(8)] == pytest.approx([0, 0.5, 0.5, 0.25, 0, 0.5, 0.5, 0.25])
    with pytest.raises(ConfigError, match="one entry per cycle"):
        linear_cycle_schedule([2], [0.0, 0.0], [1.0], [0.0], [4])
    with pytest.raises(ConfigError, match="nowhere"):
        make_ddpm(scheduler_config={"target": "nowhere.Scheduler"})


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def test_ckpt_path_round_trip_ignore_keys_and_unet_only(tmp_path):
    src = randomize_zero_layers(make_ddpm(seed=1, use_ema=False))
    path = tmp_path / "ddpm.ckpt"
    torch.save({"state_dict": src.state_dict(), "global_step": 7}, path)
    loaded = make_ddpm(seed=2, ckpt_path=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    kept = make_ddpm(seed=2)
    partial = make_ddpm(seed=2, ckpt_path=str(path), ignore_keys=["model.diffusion_model.out."])
    assert torch.equal(partial.model.diffusion_model.out[2].weight, kept.model.diffusion_model.out[2].weight)
    assert torch.equal(partial.model.diffusion_model.time_embed[0].weight, src.model.diffusion_model.time_embed[0].weight)
    unet_sd = {k: v for k, v in src.state_dict().items() if k.startswith("model.diffusion_model.")}
    torch.save(unet_sd, tmp_path / "unet.ckpt")
    only = make_ddpm(seed=2, ckpt_path=str(tmp_path / "unet.ckpt"), load_only_unet=True)
    assert torch.equal(only.model.diffusion_model.out[2].weight, src.model.diffusion_model.out[2].weight)
    # no EMA in the file: EMA starts from the loaded weights
    assert torch.equal(only.model_ema.diffusion_modelout2weight, src.model.diffusion_model.out[2].weight)


def test_bad_checkpoints_give_errors_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        make_ddpm(ckpt_path=str(tmp_path / "nope.ckpt"))
    other = make_ddpm(unet_config=unet_config(model_channels=64))
    torch.save({"state_dict": other.state_dict()}, tmp_path / "wide.ckpt")
    with pytest.raises(RuntimeError, match="wide.ckpt"):
        make_ddpm(ckpt_path=str(tmp_path / "wide.ckpt"))
    sd = {k: v for k, v in make_ddpm().state_dict().items() if k != "betas"}
    torch.save(sd, tmp_path / "partial.ckpt")
    with pytest.raises(RuntimeError, match=r"partial.ckpt.*missing key.*betas"):
        make_ddpm(ckpt_path=str(tmp_path / "partial.ckpt"))


# ---- sampling -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "plms"])
def test_each_sampler_returns_images_in_range_deterministic_under_a_generator(sampler):
    model = make_ddpm(timesteps=20)
    randomize_zero_layers(model)
    run = lambda seed: model.sample(batch_size=3, sampler=sampler, steps=5,  # noqa: E731
                                    generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (3, 3, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    images_, latents = model.sample(batch_size=2, sampler=sampler, steps=5, return_latents=True)
    assert images_.shape == latents.shape == (2, 3, 8, 8)


def test_sampling_uses_ema_weights_unless_told_not_to():
    model = make_ddpm(timesteps=20)
    randomize_zero_layers(model)                                   # EMA = the current weights
    reference = model.sample(batch_size=2, steps=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.model.diffusion_model.out[2].weight.add_(1.0)         # training weights drift away
    ema = model.sample(batch_size=2, steps=4, generator=torch.Generator().manual_seed(0))
    raw = model.sample(batch_size=2, steps=4, generator=torch.Generator().manual_seed(0), use_ema=False)
    assert torch.equal(ema, reference) and not torch.equal(raw, reference)


def test_sampling_errors():
    model = make_ddpm()
    with pytest.raises(ValueError, match="unknown sampler"):
        model.sample(batch_size=1, sampler="euler_b")
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(batch_size=1, guidance_scale=3.0)
    with pytest.raises(ValueError, match="eta must be 0"):
        model.sample(batch_size=1, sampler="plms", eta=0.5, steps=2)


def test_log_images_keys_shapes_and_range():
    model = make_ddpm()
    logs = model.log_images({"image": images(5)}, N=3, split="val", ddim_steps=4, plot_denoise_rows=True)
    assert set(logs) == {"inputs", "diffusion_row", "samples", "denoise_row"}
    assert logs["inputs"].shape == logs["samples"].shape == (3, 3, 8, 8)
    # diffusion row: 3 rows, columns t = 0, 10, 20, 30, 40, 49 (log_every_t = 10); 8 px + 2 px padding each
    assert logs["diffusion_row"].shape == (1, 3, 2 + 3 * 10, 2 + 6 * 10)
    for v in logs.values():
        assert v.ndim == 4 and v.min() >= -1 and v.max() <= 1


# ---- DiffusionWrapper -----------------------------------------------------------------------------------------------
class RecordingNet(nn.Module):
    """Stands in for the U-Net: records its inputs, returns x[:, :3]."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, context=None, y=None):
        self.calls.append({"x": x, "t": t, "context": context, "y": y})
        return x[:, :3]


def wrapper(key):
    return DiffusionWrapper({"target": "tests.test_ddpm.RecordingNet"}, key)


def test_diffusion_wrapper_routes_each_conditioning_key():
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([1, 2])
    concat, ctx = torch.randn(2, 2, 4, 4), torch.randn(2, 5, 8)
    w = wrapper("concat")
    w(x, t, c_concat=[concat[:, :1], concat[:, 1:]])  # CompVis lists are joined
    assert torch.equal(w.diffusion_model.calls[-1]["x"], torch.cat([x, concat], 1))
    w = wrapper("crossattn")
    w(x, t, c_crossattn=[ctx[:, :2], ctx[:, 2:]])
    assert torch.equal(w.diffusion_model.calls[-1]["context"], ctx)
    w = wrapper("hybrid")
    w(x, t, c_concat=concat, c_crossattn=ctx)
    call = w.diffusion_model.calls[-1]
    assert call["x"].shape == (2, 5, 4, 4) and torch.equal(call["context"], ctx)
    w = wrapper("adm")
    w(x, t, c_adm=torch.randn(2, 1, 8))
    assert w.diffusion_model.calls[-1]["y"].shape == (2, 8)
    w = wrapper(None)
    w(x, t)
    assert w.diffusion_model.calls[-1]["context"] is None and w.diffusion_model.calls[-1]["y"] is None


def test_diffusion_wrapper_errors():
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"missing \['c_crossattn'\]"):
        wrapper("crossattn")(x, t)
    with pytest.raises(ValueError, match=r"unexpected \['c_concat'\]"):
        wrapper("crossattn")(x, t, c_concat=x, c_crossattn=torch.randn(2, 1, 4))
    with pytest.raises(ConfigError, match="crossattn-adm"):
        wrapper("crossattn-adm")


# ---- it learns ------------------------------------------------------------------------------------------------------
COLOURS = torch.tensor([[0.8, -0.6, -0.6], [-0.6, -0.4, 0.8]])


def two_colours(n: int, generator: torch.Generator) -> torch.Tensor:
    """n constant 8x8 images, each one of the two COLOURS at random."""
    return COLOURS[torch.randint(0, 2, (n,), generator=generator)].view(n, 3, 1, 1).expand(n, 3, 8, 8).contiguous()


@torch.no_grad()
def x0_error(model: DDPM, x0: torch.Tensor, t: int) -> float:
    """Mean squared error of the x0 the model infers from x_t = q_sample(x0, t) (fixed noise)."""
    tt = torch.full((len(x0),), t)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    a, b = model.sqrt_alphas_cumprod[t], model.sqrt_one_minus_alphas_cumprod[t]
    x_t = a * x0 + b * noise
    return ((x_t - b * model.apply_model(x_t, tt)) / a - x0).pow(2).mean().item()


@pytest.mark.slow
def test_tiny_ddpm_learns_two_colours():
    model = make_ddpm(timesteps=100, beta_schedule="cosine", use_ema=False)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=2e-3)
    data, held_out = torch.Generator().manual_seed(0), two_colours(16, torch.Generator().manual_seed(99))
    before = x0_error(model, held_out, t=50)
    losses = []
    for step in range(150):
        loss = model.training_step({"image": two_colours(16, data)}, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.4 * first, (first, last)
    assert x0_error(model, held_out, t=50) < 0.2 * before

"""The StableSR module: the frozen / trainable split (the optimizer sees only the encoder and SFT layers, the base
stays bit-identical through training), step 0 = the base model, base and StableSR checkpoints, sampling from the
LR latent with the encoder re-run per step, the empty prompt of an OpenCLIP conditioner, config errors."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import save_checkpoint_atomic
from ldm.diffusion import q_sample
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.models.stablesr import StableSR
from ldm.util import ConfigError
from tests.test_ddpm import single_thread  # noqa: F401 - autouse fixture
from tests.test_latent_diffusion import FIRST_STAGE, shapes_batch

BASE_UNET = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, channel_mult=[1, 2],
                 num_res_blocks=1, attention_resolutions=[2], num_head_channels=32)
ENCODER = {"target": "ldm.modules.stablesr.TimeAwareEncoder",
           "params": dict(in_channels=3, model_channels=32, out_channels=32, num_res_blocks=1, channel_mult=[1, 2],
                          attention_resolutions=[2], num_head_channels=32)}
OPENCLIP = {"target": "ldm.modules.encoders.FrozenOpenCLIPEmbedder",
            "params": {"arch": {"width": 32, "layers": 2, "heads": 2, "embed_dim": 32}, "layer": "penultimate",
                       "pretrained": False}}
REPO = Path(__file__).resolve().parents[1]
COMMON = dict(first_stage_config=FIRST_STAGE, timesteps=50, image_size=8, channels=3, log_every_t=10,
              parameterization="v", scale_by_std=True)


def text_params(unet: dict) -> dict:
    return dict(unet, use_spatial_transformer=True, context_dim=32)


def sft_unet(form: str = "sft", text: bool = False) -> dict:
    unet = text_params(BASE_UNET) if text else BASE_UNET
    return {"target": "ldm.modules.stablesr.SFTUNetModel",
            "params": dict(unet, semb_channels=32, sft_form=form, sft_hidden_channels=16)}


def make_sr(form: str = "sft", text: bool = False, seed: int = 0, **kw) -> StableSR:
    torch.manual_seed(seed)
    cond = dict(cond_stage_config=OPENCLIP, conditioning_key="crossattn", cond_stage_key="caption") if text else {}
    params = COMMON | cond | dict(unet_config=sft_unet(form, text), structcond_stage_config=ENCODER,
                                  allow_random_first_stage=True, use_ema=False) | kw
    return StableSR(**params)


def make_base(text: bool = False, seed: int = 0) -> LatentDiffusion:
    """A 'trained' base: random weights everywhere (the zero-initialised layers too), its EMA copy differing."""
    torch.manual_seed(seed)
    cond = dict(cond_stage_config=OPENCLIP, conditioning_key="crossattn", cond_stage_key="caption") if text else {}
    unet = {"target": "ldm.modules.diffusionmodules.unet.UNetModel",
            "params": text_params(BASE_UNET) if text else BASE_UNET}
    base = LatentDiffusion(**(COMMON | cond | dict(unet_config=unet, allow_random_first_stage=True, use_ema=True)))
    with torch.no_grad():
        for p in base.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        base.scale_factor.fill_(0.7)
    base.model_ema(base.model)                                # EMA = 0.9 * init + 0.1 * current: not the weights
    return base


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    base = make_base()
    path = tmp_path_factory.mktemp("base") / "base.ckpt"
    save_checkpoint_atomic({"state_dict": base.state_dict()}, path)
    return base, path


def frozen_state(model: StableSR) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()
            if not (k.startswith(("structcond_stage_model.", "model_ema.")) or ".spade." in k)}


# ---- frozen / trainable ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["sft", "spade"])
def test_only_the_encoder_and_sft_layers_train_and_the_base_stays_bit_identical(base_ckpt, form):
    _, path = base_ckpt
    model = make_sr(form, ckpt_path=str(path), use_ema=True).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("structcond_stage_model.") or ".spade." in n for n in trainable)
    assert {n for n in trainable if n.startswith("structcond_stage_model.")} == {
        f"structcond_stage_model.{n}" for n, _ in model.structcond_stage_model.named_parameters()}
    opt = model.configure_optimizers()
    seen = {id(p) for group in opt.param_groups for p in group["params"]}
    assert seen == {id(p) for n, p in model.named_parameters() if n in trainable}
    assert set(model.model_ema.m_name2s_name) == {n for n, p in model._ema_targets().named_parameters()
                                                  if p.requires_grad}
    before, trained_before = frozen_state(model), {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = shapes_batch(4)
    for step in range(3):
        loss = model.training_step(batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_ema()                      # what the optimizer_step hook does after the step
    after = frozen_state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(not torch.equal(p, trained_before[n]) for n, p in model.named_parameters() if p.requires_grad
               and "param_free_norm" not in n)
    assert int(model.model_ema.num_updates) == 3


def test_step_zero_is_the_base_model_exactly_in_the_sft_form(base_ckpt):
    base, path = base_ckpt
    model = make_sr("sft", ckpt_path=str(path))
    unet = model.model.diffusion_model.state_dict()
    for k, v in base.model.diffusion_model.state_dict().items():         # the base's EMA weights are frozen
        assert torch.equal(unet[k], base.model_ema.state_dict()["diffusion_model" + k.replace(".", "")])
    assert float(model.scale_factor) == pytest.approx(0.7) and model._scale_factor_ready
    with base.ema_scope():
        batch = shapes_batch(4)
        z, cond = model.get_input(batch)
        t, noise = torch.randint(0, 50, (4,)), torch.randn_like(z)
        assert torch.equal(model.p_losses(z, cond, t, noise)[0], base.p_losses(z, {}, t, noise)[0])
        x = torch.randn_like(z)
        assert torch.equal(model.apply_model(x, t, **cond), base.apply_model(x, t))
        spade = make_sr("spade", ckpt_path=str(path))              # the SPADE form: independent of the LR input
        other = dict(cond, c_lr=torch.randn_like(cond["c_lr"]))
        assert torch.equal(spade.apply_model(x, t, **cond), spade.apply_model(x, t, **other))
        assert not torch.allclose(spade.apply_model(x, t, **cond), base.apply_model(x, t), atol=1e-3)


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def test_stablesr_checkpoints_round_trip_strictly_and_partial_files_are_errors(tmp_path, base_ckpt):
    _, path = base_ckpt
    model = make_sr("spade", ckpt_path=str(path), use_ema=True)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(1.0)
    save_checkpoint_atomic({"state_dict": model.state_dict()}, tmp_path / "sr.ckpt")
    again = make_sr("spade", seed=3, ckpt_path=str(tmp_path / "sr.ckpt"), use_ema=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    dropped = "model.diffusion_model.input_blocks.1.0.spade.mlp_beta.bias"
    sd = {k: v for k, v in model.state_dict().items() if k != dropped}
    save_checkpoint_atomic({"state_dict": sd}, tmp_path / "partial.ckpt")
    with pytest.raises(RuntimeError, match="read as a StableSR checkpoint.*1 missing key.*spade.mlp_beta.bias"):
        make_sr("spade", ckpt_path=str(tmp_path / "partial.ckpt"))
    with pytest.raises(RuntimeError, match="read as a base LDM checkpoint.*unexpected key.*cond_stage_model"):
        make_sr("spade", ckpt_path=str(path), first_stage_cache_size=0, cond_stage_config=None).init_from_ckpt(
            _with_extra(path, tmp_path))


def _with_extra(path, tmp_path) -> str:
    sd = torch.load(path, weights_only=True)["state_dict"] | {"cond_stage_model.weight": torch.zeros(1)}
    save_checkpoint_atomic({"state_dict": sd}, tmp_path / "extra.ckpt")
    return str(tmp_path / "extra.ckpt")


# ---- sampling -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler, steps, first_t, calls", [("ddpm", 0, 49, 50), ("ddim", 5, 49, 6),
                                                              ("plms", 5, 49, 7)])  # PLMS: 2 calls at step 1
def test_sampling_starts_from_the_noised_lr_latent_and_reruns_the_encoder_each_step(base_ckpt, sampler, steps,
                                                                                    first_t, calls):
    _, path = base_ckpt
    model = make_sr("spade", ckpt_path=str(path)).eval()
    cond = model.lr_condition(shapes_batch(2)["lr_image"], scale=2)     # 8x8 LR -> 16x16 -> 8x8 latents
    seen = []
    model.structcond_stage_model.register_forward_hook(lambda m, args, out: seen.append((args[0], args[1].clone())))
    calls_x = []
    model.model.register_forward_hook(lambda m, args, out: calls_x.append(args[0]))
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = model.sample_latents(cond, sampler=sampler, steps=steps or 50, x_T=x_T)
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    assert len(seen) == calls and all(torch.equal(z, cond["c_lr"]) for z, _ in seen)   # the clean LR latent
    ts = [int(t[0]) for _, t in seen]
    assert ts[0] == first_t and ts == sorted(ts, reverse=True)
    start = q_sample(cond["c_lr"], torch.full((2,), 49), x_T, model.schedule)
    torch.testing.assert_close(calls_x[0], start, rtol=0, atol=0)
    model.sample_start = "noise"
    calls_x.clear()
    model.sample_latents(cond, sampler="ddim", steps=2, x_T=x_T)
    assert torch.equal(calls_x[0], x_T)


def test_empty_prompt_conditioner_guidance_and_image_logging():
    model = make_sr("spade", text=True).eval()
    batch = shapes_batch(2)                                 # its captions are not read: the empty prompt
    z, cond = model.get_input(batch)
    assert set(cond) == {"c_crossattn", "c_lr"} and cond["c_crossattn"].shape == (2, 77, 32)
    empty = model.get_learned_conditioning(["", ""])
    assert torch.equal(cond["c_crossattn"], empty)
    lr_cond = model.lr_condition(batch["lr_image"], scale=2)
    assert torch.equal(lr_cond["c_crossattn"], empty) and lr_cond["c_lr"].shape == (2, 3, 8, 8)
    images = model.sample({"c_lr": lr_cond["c_lr"]}, sampler="ddim", steps=2, guidance_scale=2.0)
    assert images.shape == (2, 3, 16, 16)
    logs = model.log_images(batch, N=2, ddim_steps=2)
    assert {"inputs", "reconstruction", "lr_upsampled", "samples"} <= set(logs)
    assert logs["lr_upsampled"].shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="StableSR samples from an LR latent"):
        model.sample({"c_crossattn": empty}, steps=2)


# ---- configs --------------------------------------------------------------------------------------------------------
def test_tiny_stablesr_config_sits_on_the_tiny_base_config():
    """Same U-Net (plus SFT), first stage, schedule and parameterisation as ldm_photos_base_tiny.yaml, whose
    checkpoint it loads; the encoder's outputs cover the U-Net's widths."""
    base = OmegaConf.load(REPO / "configs" / "diffusion" / "ldm_photos_base_tiny.yaml").model.params
    sr = OmegaConf.load(REPO / "configs" / "diffusion" / "stablesr_photos_tiny.yaml").model.params
    sft = {k: v for k, v in sr.unet_config.params.items() if not k.startswith(("semb", "sft_"))}
    assert sft == base.unet_config.params
    first = OmegaConf.to_container(base.first_stage_config.params)
    first.pop("ckpt_path")
    assert OmegaConf.to_container(sr.first_stage_config.params) == first
    for key in ("timesteps", "parameterization", "linear_start", "linear_end", "image_size", "channels",
                "scale_by_std"):
        assert sr[key] == base[key], key
    assert sr.structcond_stage_config.params.channel_mult == sr.unet_config.params.channel_mult
    assert sr.structcond_stage_config.params.out_channels == sr.unet_config.params.semb_channels


# ---- config errors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (dict(unet_config={"target": "ldm.modules.diffusionmodules.unet.UNetModel", "params": BASE_UNET}),
     "StableSR needs an SFT U-Net"),
    (dict(ckpt_path="???"), "model.params.ckpt_path is not set: point it at the base LDM's checkpoint"),
    (dict(sample_start="middle"), "sample_start='middle'"),
    (dict(cond_stage_config=OPENCLIP, conditioning_key="crossattn", cond_stage_trainable=True),
     "trains only the time-aware encoder"),
    (dict(structcond_stage_config={**ENCODER, "params": {**ENCODER["params"], "out_channels": 64}}),
     "out_channels=64 must equal the U-Net's semb_channels \\(32\\)"),
    (dict(structcond_stage_cfg=ENCODER), "unexpected keyword argument 'structcond_stage_cfg'")])
def test_config_errors_name_the_key(change, message):
    with pytest.raises((ConfigError, TypeError), match=message):
        make_sr(**change)


def test_sigma_samplers_start_from_the_same_noised_lr_latent(base_ckpt):
    """DPM++ 2M from c_lr at strength 1: its first network input is q_sample(c_lr, T - 1, x_T), as the discrete
    samplers' start, and the encoder sees the clean LR latent at every call."""
    _, path = base_ckpt
    model = make_sr("spade", ckpt_path=str(path)).eval()
    cond = model.lr_condition(shapes_batch(2)["lr_image"], scale=2)
    seen, calls_x = [], []
    model.structcond_stage_model.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model.model.register_forward_hook(lambda m, args, out: calls_x.append((args[0], args[1].clone())))
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = model.sample_latents(cond, sampler="dpmpp_2m", sigma_schedule="karras", steps=5, x_T=x_T)
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    assert len(calls_x) == 5 and all(torch.equal(z, cond["c_lr"]) for z in seen)
    start = q_sample(cond["c_lr"], torch.full((2,), 49), x_T, model.schedule)
    torch.testing.assert_close(calls_x[0][0], start, rtol=0, atol=1e-5)
    assert float(calls_x[0][1][0]) == pytest.approx(49.0)

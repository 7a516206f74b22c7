"""LatentDiffusion: SD 1.x key layout, frozen first stage, scale_by_std (also under DDP), conditioning keys and
dropout, guided sampling, image logging, task datasets, panels, and every tiny config through main.py."""
import copy
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from omegaconf import OmegaConf

import main
from ldm import visualization
from ldm.data.shapes import Shapes
from ldm.data.tasks import Inpainting, SuperResolution
from ldm.diffusion import BUFFER_NAMES
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.conditioning import drop_mask, drop_probabilities, replace_where
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.util import ConfigError, instantiate_from_config
from tests.test_ddpm import randomize_zero_layers, single_thread  # noqa: F401 - autouse fixture

REPO = Path(__file__).resolve().parents[1]
UNET = "ldm.modules.diffusionmodules.unet.UNetModel"
DDCONFIG = dict(double_z=True, z_channels=3, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)      # f = 2: 16x16 images -> 3x8x8 latents
FIRST_STAGE = {"target": "ldm.models.autoencoder.AutoencoderKL",
               "params": {"embed_dim": 3, "ddconfig": DDCONFIG, "lossconfig": {"target": "torch.nn.Identity"}}}
CLASS = {"target": "ldm.modules.encoders.ClassEmbedder",
         "params": {"embed_dim": 32, "n_classes": 4, "add_null_class": True}}
LAYOUT = {"target": "ldm.modules.encoders.LayoutEmbedder",
          "params": {"n_embed": 32, "n_layer": 1, "n_classes": 4, "n_coord_bins": 8, "max_objects": 4, "heads": 2,
                     "dim_head": 16}}
SEGMENTATION = {"target": "ldm.modules.encoders.SpatialRescaler",
                "params": {"n_stages": 1, "method": "area", "multiplier": 0.5, "n_classes": 5}}


def unet_config(in_channels: int = 3, context_dim: int | None = None, **kw) -> dict:
    params = dict(image_size=8, in_channels=in_channels, out_channels=3, model_channels=32, channel_mult=[1, 2],
                  num_res_blocks=1, attention_resolutions=[2], num_head_channels=32)
    if context_dim is not None:
        params.update(use_spatial_transformer=True, context_dim=context_dim)
    return {"target": UNET, "params": params | kw}


def make_ldm(seed: int = 0, **kw) -> LatentDiffusion:
    torch.manual_seed(seed)
    params = dict(first_stage_config=FIRST_STAGE, unet_config=unet_config(), timesteps=50, image_size=8, channels=3,
                  log_every_t=10, allow_random_first_stage=True) | kw
    return LatentDiffusion(**params)


def class_ldm(**kw) -> LatentDiffusion:
    return make_ldm(**(dict(cond_stage_config=CLASS, unet_config=unet_config(context_dim=32),
                            conditioning_key="crossattn", cond_stage_key="class_label") | kw))


def shapes_batch(n: int = 4, seed: int = 0) -> dict:
    """Shapes samples (16x16) with the SR and inpainting inputs added."""
    data = Inpainting(SuperResolution(Shapes(size=16, length=64, seed=seed), scale=2), fixed_masks=True)
    return torch.utils.data.default_collate([data[i] for i in range(n)])


# the conditioning set-ups exercised per conditioning_key
SETUPS = {
    "none": dict(),
    "concat-sr": dict(cond_stage_config={"target": "torch.nn.Identity"}, cond_stage_key="lr_image",
                      conditioning_key="concat", unet_config=unet_config(in_channels=6)),
    "concat-semantic": dict(cond_stage_config=SEGMENTATION, cond_stage_key="segmentation", conditioning_key="concat",
                            unet_config=unet_config(in_channels=8)),
    "concat-inpaint": dict(conditioning_key="concat", masked_image_key="masked_image", mask_key="mask",
                           unet_config=unet_config(in_channels=7)),
    "concat-first-stage": dict(cond_stage_config="__is_first_stage__", cond_stage_key="masked_image",
                               conditioning_key="concat", unet_config=unet_config(in_channels=6)),
    "crossattn-class": dict(cond_stage_config=CLASS, cond_stage_key="class_label", conditioning_key="crossattn",
                            cond_stage_trainable=True, unet_config=unet_config(context_dim=32)),
    "crossattn-layout": dict(cond_stage_config=LAYOUT, cond_stage_key="objects", conditioning_key="crossattn",
                             cond_stage_trainable=True, unet_config=unet_config(context_dim=32)),
    "hybrid-layout": dict(cond_stage_config={**LAYOUT, "params": {**LAYOUT["params"], "raster_size": 8}},
                          cond_stage_key="objects", conditioning_key="hybrid", cond_stage_trainable=True,
                          cond_drop_prob={"crossattn": 0.5, "concat": 0.0},
                          unet_config=unet_config(in_channels=7, context_dim=32)),
    "hybrid": dict(cond_stage_config=CLASS, cond_stage_key="class_label", conditioning_key="hybrid",
                   masked_image_key="masked_image", mask_key="mask", cond_stage_trainable=True,
                   unet_config=unet_config(in_channels=7, context_dim=32)),
    "adm": dict(cond_stage_config=CLASS, cond_stage_key="class_label", conditioning_key="adm",
                cond_stage_trainable=True, unet_config=unet_config(num_classes="sequential", adm_in_channels=32)),
}


# ---- construction and checkpoint layout -------------------------------------------------------------------------
def test_checkpoint_keys_follow_the_sd_layout():
    model = class_ldm(scale_by_std=True)
    sd = model.state_dict()
    assert {k for k in sd if "." not in k} == set(BUFFER_NAMES) | {"scale_factor"}   # no logvar
    assert {k.split(".")[0] for k in sd if "." in k} == {"model", "first_stage_model", "cond_stage_model",
                                                         "model_ema"}
    assert all(k.startswith("model.diffusion_model.") for k in sd if k.startswith("model."))
    assert "cond_stage_model.embedding.weight" in sd
    assert {k[len("first_stage_model."):] for k in sd if k.startswith("first_stage_model.")} == set(
        AutoencoderKL(DDCONFIG, {"target": "torch.nn.Identity"}, embed_dim=3).state_dict())
    ema = {k[len("model_ema."):] for k in sd if k.startswith("model_ema.")}
    assert ema == {"decay", "num_updates"} | {k[len("model."):].replace(".", "") for k in sd
                                              if k.startswith("model.")}
    assert "scale_factor" not in make_ldm(scale_factor=0.18215).state_dict()


def test_builds_from_config_and_optimizes_unet_and_trainable_conditioner_only():
    model = instantiate_from_config({"target": "ldm.models.latent_diffusion.LatentDiffusion",
                                     "params": SETUPS["crossattn-class"] | {
                                         "first_stage_config": FIRST_STAGE, "allow_random_first_stage": True,
                                         "timesteps": 50, "image_size": 8, "channels": 3}})
    optimized = {id(p) for g in model.configure_optimizers().param_groups for p in g["params"]}
    expected = {id(p) for p in model.model.parameters()} | {id(p) for p in model.cond_stage_model.parameters()}
    assert optimized == expected
    frozen = make_ldm(**(SETUPS["crossattn-class"] | {"cond_stage_trainable": False}))
    optimized = {id(p) for g in frozen.configure_optimizers().param_groups for p in g["params"]}
    assert optimized == {id(p) for p in frozen.model.parameters()}


@pytest.mark.parametrize("trainable", [True, False])
def test_training_step_grads_in_unet_and_trainable_conditioner_never_first_stage(trainable):
    model = class_ldm(cond_stage_trainable=trainable)
    model.train()
    loss = model.training_step(shapes_batch(), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.first_stage_model.parameters())
    cond_grads = [p.grad for p in model.cond_stage_model.parameters()]
    assert all(g is not None for g in cond_grads) if trainable else all(g is None for g in cond_grads)


def test_first_stage_and_frozen_conditioner_stay_in_eval_mode():
    model = class_ldm(cond_stage_trainable=False)
    model.train()
    assert model.training and model.model.training
    assert not any(m.training for m in model.first_stage_model.modules())
    assert not any(m.training for m in model.cond_stage_model.modules())
    assert class_ldm(cond_stage_trainable=True).train().cond_stage_model.training


@pytest.mark.parametrize("setup", list(SETUPS))
def test_each_conditioning_key_runs_a_training_step(setup):
    model = make_ldm(**SETUPS[setup])
    model.train()
    batch = shapes_batch()
    z, cond = model.get_input(batch)
    assert z.shape == (4, 3, 8, 8)
    assert all(v.shape[0] == 4 for v in cond.values())
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert sum(p.grad.abs().sum() for p in model.model.parameters() if p.grad is not None) > 0


def test_inpainting_condition_is_masked_latent_and_resized_mask():
    model = make_ldm(**SETUPS["concat-inpaint"])
    batch = shapes_batch()
    cond = model.get_conditioning(batch)["c_concat"]
    assert cond.shape == (4, 4, 8, 8)
    expected_z = model.scale_factor * model.first_stage_model.encode(batch["masked_image"]).mode()
    assert torch.allclose(cond[:, :3], expected_z, atol=1e-6)
    assert torch.equal(cond[:, 3:], batch["mask"][:, :, ::2, ::2])


def test_layout_hybrid_draws_the_boxes_for_concat_and_drops_them_with_the_tokens():
    model = make_ldm(**SETUPS["hybrid-layout"])
    batch = shapes_batch(n=8)
    cond = model.get_conditioning(batch)
    assert set(cond) == {"c_concat", "c_crossattn"} and cond["c_concat"].shape == (8, 4, 8, 8)
    first = batch["objects"][0, 0]                                     # (class, x0, y0, x1, y1) of image 0
    cls, (x0, y0, x1, y1) = int(first[0]), (first[1:] * 8).tolist()
    cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
    assert cond["c_concat"][0, cls, cy, cx] == 1                       # the box's centre cell, its class channel
    null = model.null_condition(8)
    assert (null["c_concat"] == 0).all()                               # the empty layout draws nothing
    assert torch.allclose(null["c_crossattn"][0], model.get_learned_conditioning(
        model.cond_stage_model.null_condition(1))["c_crossattn"][0])
    torch.manual_seed(0)
    dropped = model.get_conditioning(batch, drop=True)                 # tokens and map dropped together
    empty = (dropped["c_concat"].flatten(1) == 0).all(1)
    same_tokens = torch.isclose(dropped["c_crossattn"], null["c_crossattn"], atol=1e-6).flatten(1).all(1)
    assert 0 < empty.sum() < 8 and torch.equal(empty, same_tokens)
    randomize_zero_layers(model)
    images = model.sample(model.get_learned_conditioning(batch["objects"][:2]), steps=3, guidance_scale=3.0)
    assert images.shape == (2, 3, 16, 16)
    with pytest.raises(ConfigError, match="c_concat source"):
        make_ldm(**(SETUPS["hybrid-layout"] | {"cond_stage_config": LAYOUT}))


# ---- first stage and scale_factor ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [None, "???"])
def test_unset_first_stage_ckpt_is_a_config_error(path):
    config = copy.deepcopy(FIRST_STAGE)
    config["params"]["ckpt_path"] = path
    with pytest.raises(ConfigError, match="first_stage_config.params.ckpt_path is not set"):
        make_ldm(first_stage_config=config, allow_random_first_stage=False)


def test_missing_first_stage_file_names_it_and_an_existing_one_is_loaded(tmp_path):
    config = copy.deepcopy(FIRST_STAGE)
    config["params"]["ckpt_path"] = str(tmp_path / "no_such_autoencoder.ckpt")
    with pytest.raises(FileNotFoundError, match="no_such_autoencoder.ckpt"):
        make_ldm(first_stage_config=config)
    torch.manual_seed(5)
    ae = AutoencoderKL(DDCONFIG, {"target": "torch.nn.Identity"}, embed_dim=3)
    torch.save({"state_dict": ae.state_dict()}, tmp_path / "ae.ckpt")
    config["params"]["ckpt_path"] = str(tmp_path / "ae.ckpt")
    model = make_ldm(first_stage_config=config, allow_random_first_stage=False)
    for k, v in ae.state_dict().items():
        assert torch.equal(model.first_stage_model.state_dict()[k], v)


def test_scale_by_std_is_one_over_the_first_batch_std_and_restored_not_recomputed(tmp_path):
    model = make_ldm(scale_by_std=True)
    batch, other = shapes_batch(seed=0), shapes_batch(seed=1)
    torch.manual_seed(3)
    z = model.encode_first_stage(batch["image"])
    torch.manual_seed(3)
    model.on_train_batch_start(batch, 0)
    assert torch.allclose(model.scale_factor, 1 / z.std(), rtol=1e-5)
    value = model.scale_factor.clone()
    model.on_train_batch_start(other, 1)                       # only the first batch counts
    assert torch.equal(model.scale_factor, value)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ldm.ckpt")
    for restored in (make_ldm(seed=1, scale_by_std=True, ckpt_path=str(tmp_path / "ldm.ckpt")),
                     make_ldm(seed=1, scale_by_std=True)):
        restored.load_state_dict(model.state_dict())
        restored.on_train_batch_start(other, 0)
        assert torch.equal(restored.scale_factor, value)
    fresh = make_ldm(seed=1, scale_by_std=True)
    fresh.on_train_batch_start(other, 0)
    assert not torch.equal(fresh.scale_factor, value)


def test_first_stage_cache_matches_the_encoder_and_skips_it_for_seen_images():
    plain, cached = make_ldm(), make_ldm(first_stage_cache_size=6)
    images = shapes_batch(n=8)["image"]
    calls = []
    encode = cached.first_stage_model.encode
    cached.first_stage_model.encode = lambda x: calls.append(len(x)) or encode(x)
    first = images[:4]
    repeat = torch.cat([images[2:4], images[2:3], images[4:6]])        # two seen, one seen twice, two new
    for batch in (first, repeat):
        want = plain.first_stage_model.encode(batch)
        out = cached.first_stage_cache.encode(batch, cached.first_stage_model.encode)
        assert torch.allclose(out.mean, want.mean, atol=1e-6) and torch.allclose(out.logvar, want.logvar, atol=1e-6)
    assert calls == [4, 2]                                             # only the two new images were encoded
    assert cached.first_stage_cache.hits == 3 and len(cached.first_stage_cache) == 6
    torch.manual_seed(0)
    a = cached.encode_first_stage(first)                               # posterior still sampled afresh
    b = cached.encode_first_stage(first)
    assert not torch.equal(a, b) and torch.allclose(cached.encode_first_stage(first, sample=False),
                                                    plain.encode_first_stage(first, sample=False), atol=1e-6)
    cached.encode_first_stage(images)                                  # 8 images through a 6-entry LRU
    assert len(cached.first_stage_cache) == 6
    cached.load_state_dict(plain.state_dict())                         # new weights: nothing stale is kept
    assert len(cached.first_stage_cache) == 0
    with pytest.raises(ConfigError, match="first_stage_cache_size"):
        make_ldm(first_stage_cache_size=-1)


def _ddp_scale_factor_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        model = make_ldm(scale_by_std=True)                   # same seed: the same first stage on every rank
        batch = shapes_batch(n=4, seed=10 + rank)             # each rank sees different pictures
        torch.manual_seed(rank)
        z = model.encode_first_stage(batch["image"])
        torch.manual_seed(rank)
        model.on_train_batch_start(batch, 0)
        torch.save({"z": z, "scale_factor": model.scale_factor}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_scale_by_std_is_identical_on_every_ddp_rank(tmp_path):
    mp.spawn(_ddp_scale_factor_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["scale_factor"], r1["scale_factor"])
    pooled = torch.cat([r0["z"], r1["z"]]).double().std()
    assert torch.allclose(r0["scale_factor"].double(), 1 / pooled, rtol=1e-5)
    assert not torch.allclose(1 / r0["z"].std(), 1 / r1["z"].std(), rtol=1e-3)  # ranks alone would disagree


def test_full_checkpoint_needs_no_first_stage_file(tmp_path):
    src = class_ldm(seed=3, scale_by_std=True)
    src.on_train_batch_start(shapes_batch(), 0)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "full.ckpt")
    loaded = class_ldm(seed=4, scale_by_std=True, allow_random_first_stage=False, ckpt_path=str(tmp_path / "full.ckpt"))
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# ---- conditioning dropout -------------------------------------------------------------------------------------------
def test_conditioning_dropout_replaces_about_p_of_the_conditions_by_the_null_one():
    n = 4000
    batch = {"image": torch.zeros(n, 3, 16, 16), "class_label": torch.randint(0, 4, (n,))}
    model = class_ldm(cond_drop_prob=0.3)
    null = model.get_learned_conditioning(torch.tensor([4]))                          # (1, 1, D)
    torch.manual_seed(0)
    c = model.get_conditioning(batch, drop=True)["c_crossattn"]
    fraction = (c == null).all(dim=-1).float().mean().item()
    assert abs(fraction - 0.3) < 0.03
    assert not (model.get_conditioning(batch, drop=False)["c_crossattn"] == null).all(dim=-1).any()
    assert not (class_ldm(cond_drop_prob=0.0).get_conditioning(batch, drop=True)["c_crossattn"] == null).any()
    model.eval()
    few = {k: v[:200] for k, v in batch.items()}
    assert not (model.get_input(few)[1]["c_crossattn"] == null).all(dim=-1).any()


def test_concat_dropout_zeroes_and_caption_dropout_empties():
    model = make_ldm(**(SETUPS["concat-semantic"] | {"cond_drop_prob": {"concat": 0.5}}))
    batch = shapes_batch(n=8)
    torch.manual_seed(0)
    c = model.get_conditioning(batch, drop=True)["c_concat"]
    zeroed = (c.flatten(1) == 0).all(dim=1)
    assert 0 < zeroed.sum() < 8 and (c.flatten(1).sum(1)[~zeroed] > 0).all()
    drop = torch.tensor([True, False, True])
    assert replace_where(drop, ["a", "b", "c"], ["", "", ""]) == ["", "b", ""]
    assert 300 < drop_mask(1000, 0.35, generator=torch.Generator().manual_seed(0)).sum() < 400


def test_cond_drop_prob_forms_and_errors():
    assert drop_probabilities(0.1, ["c_concat", "c_crossattn"]) == {"c_concat": 0.1, "c_crossattn": 0.1}
    assert drop_probabilities({"crossattn": 0.2}, ["c_concat", "c_crossattn"]) == {"c_concat": 0.0,
                                                                                   "c_crossattn": 0.2}
    with pytest.raises(ConfigError, match="adm"):
        drop_probabilities({"adm": 0.1}, ["c_crossattn"])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        drop_probabilities(1.5, ["c_crossattn"])
    with pytest.raises(ConfigError, match="no null_condition"):
        make_ldm(**(SETUPS["concat-sr"] | {"conditioning_key": "crossattn", "cond_drop_prob": 0.1}))


# ---- errors for unsupported configurations --------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,match", [
    (dict(num_timesteps_cond=2), "num_timesteps_cond"),
    (dict(conditioning_key="crossattn-adm"), "crossattn-adm"),
    (dict(conditioning_key="hybrid"), "hybrid needs a c_concat source"),
    (dict(masked_image_key="masked_image"), "go together"),
    (dict(cond_stage_forward="tokenize"), "cond_stage_forward"),
    (dict(cond_stage_config="__is_something__"), "cond_stage_config"),
    (dict(use_positional_encodings=True), "use_positional_encodings"),
])
def test_unsupported_values_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        class_ldm(**overrides)


def test_sd1_yaml_keys_build():
    """Every LatentDiffusion key of SD 1.x's v1-inference.yaml (sub-configs shrunk, our targets)."""
    params = yaml.safe_load("""
      linear_start: 0.00085
      linear_end: 0.0120
      num_timesteps_cond: 1
      log_every_t: 200
      timesteps: 1000
      first_stage_key: "jpg"
      cond_stage_key: "txt"
      image_size: 8
      channels: 3
      cond_stage_trainable: false
      conditioning_key: crossattn
      monitor: val/loss_simple_ema
      scale_factor: 0.18215
      use_ema: False
      scheduler_config:
        target: ldm.lr_scheduler.LambdaLinearScheduler
        params: {warm_up_steps: [10000], cycle_lengths: [10000000000000], f_start: [1.e-6], f_max: [1.], f_min: [1.]}
    """)
    params |= {"unet_config": unet_config(context_dim=32, use_checkpoint=True, legacy=False),
               "first_stage_config": FIRST_STAGE, "cond_stage_config": CLASS, "allow_random_first_stage": True}
    model = instantiate_from_config({"target": "ldm.models.latent_diffusion.LatentDiffusion", "params": params})
    sd = model.state_dict()
    assert not any(k.startswith("model_ema.") for k in sd) and "scale_factor" not in sd
    assert model.scale_factor == 0.18215 and model.lr_multiplier(0) == pytest.approx(1e-6)
    assert sd["betas"][0].item() == pytest.approx(0.00085)
    default_key = make_ldm(cond_stage_config=SEGMENTATION, cond_stage_key="segmentation",
                           unet_config=unet_config(in_channels=8))
    assert default_key.conditioning_key == "concat"   # CompVis: concat_mode decides an unset conditioning_key


# ---- sampling -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "plms"])
def test_each_sampler_returns_decoded_images_deterministic_under_a_generator(sampler):
    model = class_ldm(timesteps=10)
    randomize_zero_layers(model)
    cond = model.get_learned_conditioning(torch.tensor([0, 1, 2]))
    run = lambda seed: model.sample(cond, sampler=sampler, steps=4,  # noqa: E731
                                    generator=torch.Generator().manual_seed(seed), return_latents=True)
    (a, za), (b, _), (c, _) = run(0), run(0), run(1)
    assert a.shape == (3, 3, 16, 16) and za.shape == (3, 3, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_guidance_scale_one_equals_no_guidance_and_scale_zero_equals_the_null_condition():
    model = class_ldm(timesteps=10)
    randomize_zero_layers(model)
    cond = model.get_learned_conditioning(torch.tensor([0, 1]))
    run = lambda c, **kw: model.sample(c, steps=4, generator=torch.Generator().manual_seed(0), **kw)  # noqa: E731
    plain = run(cond)
    assert torch.equal(run(cond, guidance_scale=1.0), plain)
    assert torch.allclose(run(cond, guidance_scale=3.0, uncond=cond), plain, atol=1e-5)
    assert torch.allclose(run(cond, guidance_scale=0.0), run(model.null_condition(2)), atol=1e-5)
    assert not torch.allclose(run(cond, guidance_scale=3.0), plain, atol=1e-3)


def test_concat_model_samples_at_the_size_of_its_condition_and_keeps_it_in_the_null():
    model = make_ldm(**SETUPS["concat-sr"])
    randomize_zero_layers(model)
    lr = torch.rand(2, 3, 12, 12) * 2 - 1
    images = model.sample(model.get_learned_conditioning(lr), steps=3)
    assert images.shape == (2, 3, 24, 24)
    assert torch.equal(model.null_condition(2, lr)["c_concat"], lr)  # trained without dropout: kept
    with pytest.raises(ValueError, match="needs `cond`"):
        model.null_condition(2)


def test_log_images_keys_shapes_and_range():
    model = class_ldm()
    logs = model.log_images(shapes_batch(n=5), N=3, split="val", ddim_steps=3, guidance_scale=2.0,
                            plot_denoise_rows=True, class_names=["circle", "square", "triangle", "star"])
    assert set(logs) == {"inputs", "reconstruction", "conditioning", "diffusion_row", "samples", "denoise_row",
                         "samples_cfg_scale_2.00"}
    for key in ("inputs", "reconstruction", "samples", "samples_cfg_scale_2.00"):
        assert logs[key].shape == (3, 3, 16, 16), key
    assert logs["conditioning"].shape == (3, 3, 128, 128)
    for v in logs.values():
        assert v.ndim == 4 and v.shape[1] == 3 and v.min() >= -1 and v.max() <= 1
    inpaint = make_ldm(**SETUPS["concat-inpaint"]).log_images(shapes_batch(), N=2, ddim_steps=2)
    assert inpaint["masked_image"].shape == (2, 3, 16, 16) and inpaint["mask"].shape == (2, 1, 16, 16)


# ---- panels and task datasets ---------------------------------------------------------------------------------------
def test_panels_draw_the_conditions():
    text = visualization.text_panel(["a red circle", ""], (32, 32))
    assert text.shape == (2, 3, 128, 128) and text[0].min() < -0.5 and (text[1] == 1).all()
    boxes = torch.tensor([[[2, 0.25, 0.25, 0.75, 0.75], [-1, 0, 0, 0, 0]]])
    panel = visualization.boxes_panel(boxes, (128, 128))
    green = torch.tensor(visualization.color(2)) / 127.5 - 1
    assert torch.allclose(panel[0, :, 64, 32], green, atol=0.01)        # on the box's left edge
    assert (panel[0, :, 64, 64] == 1).all()                             # inside: white
    seg = visualization.segmentation_panel(torch.tensor([[[0, 1], [2, 0]]]), (4, 4))
    assert (seg[0, :, 0, 0] == -1).all() and torch.allclose(seg[0, :, 0, 3], torch.tensor(visualization.color(0)) / 127.5 - 1)
    grid = visualization.image_grid([torch.zeros(2, 3, 8, 8)] * 3)
    assert grid.shape == (1, 3, 2 + 2 * 10, 2 + 3 * 10)
    assert visualization.condition_panel(torch.rand(2, 3, 4, 4), (16, 16)).shape == (2, 3, 16, 16)
    with pytest.raises(TypeError, match="cannot draw"):
        visualization.condition_panel({"a": 1}, (16, 16))


def test_task_datasets_add_lr_image_and_mask():
    data = Shapes(size=16, length=8)
    sr = SuperResolution(data, scale=4)[0]
    assert sr["lr_image"].shape == (3, 4, 4) and set(sr) >= set(data[0])
    flat = SuperResolution([{"image": torch.full((3, 8, 8), 0.3)}], scale=2)[0]["lr_image"]
    assert torch.allclose(flat, torch.full((3, 4, 4), 0.3), atol=1e-5)
    fixed = Inpainting(data, fixed_masks=True)
    item = fixed[3]
    mask = item["mask"]
    assert mask.shape == (1, 16, 16) and set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() > 0
    assert torch.equal(item["masked_image"], item["image"] * (1 - mask))
    assert torch.equal(fixed[3]["mask"], mask)
    with pytest.raises(KeyError, match="image_key"):
        SuperResolution([{"picture": torch.zeros(3, 8, 8)}])[0]
    with pytest.raises(ValueError, match="divisible"):
        SuperResolution([{"image": torch.zeros(3, 6, 6)}], scale=4)[0]


# ---- the tiny configs through main.py ------------------------------------------------------------------------------
CONFIGS = sorted((REPO / "configs" / "diffusion").glob("*_tiny.yaml"))
AUTOENCODER = {"shapes": REPO / "configs" / "autoencoder" / "kl_f2_shapes_tiny.yaml",
               "photos": REPO / "configs" / "autoencoder" / "kl_f4_photos_tiny.yaml"}


def test_every_tiny_config_is_present():
    names = {p.name for p in CONFIGS}
    assert names >= {"ddpm_shapes_tiny.yaml", "ldm_shapes_class_tiny.yaml", "ldm_shapes_text_tiny.yaml",
                     "ldm_shapes_layout_tiny.yaml", "ldm_shapes_semantic_tiny.yaml", "ldm_photos_sr_tiny.yaml",
                     "ldm_photos_inpaint_tiny.yaml"}
    for path in CONFIGS:
        config = OmegaConf.load(path)
        assert config.lightning.trainer.max_steps > 0 and "image_logger" in config.lightning.callbacks


@pytest.mark.parametrize("data", ["shapes", "photos"])
def test_first_stage_configs_match_the_autoencoder_configs(data):
    if not AUTOENCODER[data].exists():
        pytest.skip(f"{AUTOENCODER[data].name} is not written yet")
    autoencoder = OmegaConf.to_container(OmegaConf.load(AUTOENCODER[data]).model.params)
    for path in CONFIGS:
        if path.name.startswith(f"ldm_{data}"):
            first = OmegaConf.to_container(OmegaConf.load(path).model.params.first_stage_config.params)
            assert first["ddconfig"] == autoencoder["ddconfig"], path.name
            assert first["embed_dim"] == autoencoder["embed_dim"], path.name


def _small_data_overrides(config) -> list[str]:
    """Two tiny batches of the config's data (wrapped task datasets keep their wrapper)."""
    out = ["data.params.batch_size=2"]
    for split, length in (("train", 4), ("validation", 2)):
        wrapped = "dataset" in config.data.params[split].params
        out.append(f"data.params.{split}.params.{'dataset.params.' if wrapped else ''}length={length}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_tiny_config_trains_two_steps_through_main(path, tmp_path):
    config = OmegaConf.load(path)
    overrides = ["lightning.trainer.max_steps=2", "lightning.trainer.accelerator=cpu",
                 "lightning.trainer.enable_progress_bar=false", "lightning.callbacks.image_logger.params.batch_frequency=1",
                 "lightning.callbacks.image_logger.params.log_images_kwargs.N=2",
                 "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=2",
                 *_small_data_overrides(config)]
    if "first_stage_config" in config.model.params:
        first = OmegaConf.to_container(config.model.params.first_stage_config)
        first["params"]["ckpt_path"] = None
        torch.save({"state_dict": instantiate_from_config(first).state_dict()}, tmp_path / "first_stage.ckpt")
        overrides.append(f"model.params.first_stage_config.params.ckpt_path={tmp_path / 'first_stage.ckpt'}")
    if config.model.target.endswith(".StableSR"):  # its base: a tiny base LDM checkpoint (random weights)
        base = OmegaConf.load(REPO / "configs" / "diffusion" / "ldm_photos_base_tiny.yaml").model
        base = OmegaConf.to_container(base)
        base["params"]["first_stage_config"]["params"]["ckpt_path"] = None
        base["params"]["allow_random_first_stage"] = True
        sd = instantiate_from_config(base).state_dict() | {"scale_factor": torch.tensor(0.5)}
        torch.save({"state_dict": sd}, tmp_path / "base.ckpt")
        overrides.append(f"model.params.ckpt_path={tmp_path / 'base.ckpt'}")
    logs = tmp_path / "logs"
    assert main.main(["-b", str(path), "-t", "-l", str(logs), *overrides]) == 0
    [run] = [p for p in logs.iterdir() if p.is_dir()]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    sd = ckpt["state_dict"]
    assert set(BUFFER_NAMES) <= set(sd) and "logvar" not in sd
    assert any(k.startswith("model.diffusion_model.") for k in sd)
    if "first_stage_config" in config.model.params:
        assert float(sd["scale_factor"]) != 1.0 and any(k.startswith("first_stage_model.") for k in sd)
    written = os.listdir(run / "images" / "train")
    assert any(name.startswith("samples_gs-") for name in written)


def test_unset_first_stage_ckpt_in_a_tiny_config_is_one_clear_error(tmp_path, capsys):
    path = REPO / "configs" / "diffusion" / "ldm_shapes_class_tiny.yaml"
    assert main.main(["-b", str(path), "-t", "-l", str(tmp_path), "lightning.trainer.max_steps=1"]) == 2
    assert "model.params.first_stage_config.params.ckpt_path is not set" in capsys.readouterr().err

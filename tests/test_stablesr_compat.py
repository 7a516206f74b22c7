"""SD 2.x and StableSR checkpoints through ldm.load_model: the v2 configs (512-base eps, 768-v) and StableSR's
released YAML (original class paths), full size on the meta device against the published layouts (counts pinned to
StableSR's manifest), and shrunk with real numbers; an SD 2.1 base file into our StableSR config."""
import math

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from ldm.checkpoint import save_checkpoint_atomic
from ldm.compat import translate_params
from ldm.diffusion import make_schedule
from ldm.loading import build_model, load_model, load_weights
from ldm.util import ConfigError, instantiate_from_config
from tests.stablesr_layouts import sd2_layout, stablesr_layout
from tests.test_compat import offline, parameters_on_meta  # noqa: F401 - autouse fixture
from tests.test_ddpm import single_thread  # noqa: F401 - autouse fixture

V2, V2_V = "configs/compvis/v2-inference.yaml", "configs/compvis/v2-inference-v.yaml"
OURS = "configs/diffusion/stablesr_sd21_512.yaml"
SR = "ldm.models.diffusion.ddpm.LatentDiffusionSRTextWT"
SCHEDULE = make_schedule("linear", 1000, 0.00085, 0.012).buffers()
# the model section of StableSR's configs/stableSRNew/v2-finetune_text_T_512.yaml (the values; comments dropped)
RELEASED = {
    "sf": 4,
    "model": {"base_learning_rate": 5.0e-05, "target": SR, "params": {
        "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "log_every_t": 200, "timesteps": 1000,
        "first_stage_key": "image", "cond_stage_key": "caption", "image_size": 512, "channels": 4,
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": 0.18215, "use_ema": False, "unfrozen_diff": False, "random_size": False,
        "time_replace": 1000, "use_usm": True, "p2_gamma": None, "p2_k": None,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModelDualcondV2", "params": {
            "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
            "num_head_channels": 64, "use_spatial_transformer": True, "use_linear_in_transformer": True,
            "transformer_depth": 1, "context_dim": 1024, "use_checkpoint": False, "legacy": False,
            "semb_channels": 256}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": {
                "double_z": True, "z_channels": 4, "resolution": 512, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                              "params": {"freeze": True, "layer": "penultimate"}},
        "structcond_stage_config": {"target": "ldm.modules.diffusionmodules.openaimodel.EncoderUNetModelWT",
                                    "params": {
            "image_size": 96, "in_channels": 4, "model_channels": 256, "out_channels": 256, "num_res_blocks": 2,
            "attention_resolutions": [4, 2, 1], "dropout": 0, "channel_mult": [1, 1, 2, 2], "conv_resample": True,
            "dims": 2, "use_checkpoint": False, "use_fp16": False, "num_heads": 4, "num_head_channels": -1,
            "num_heads_upsample": -1, "use_scale_shift_norm": False, "resblock_updown": False,
            "use_new_attention_order": False}}}},
    "degradation": {"resize_prob": [0.2, 0.7, 0.1], "gt_size": 512, "no_degradation_prob": 0.01},
}
# the same structure, small (U-Net / encoder / VAE / OpenCLIP), and its layout
P, U, E = "model.params", "model.params.unet_config.params", "model.params.structcond_stage_config.params"
F = "model.params.first_stage_config.params.ddconfig"
SHRINK = [f"{U}.model_channels=32", f"{U}.channel_mult=[1,2]", f"{U}.num_res_blocks=1",
          f"{U}.attention_resolutions=[2,1]",
          f"{U}.num_head_channels=16", f"{U}.context_dim=32", f"{U}.semb_channels=32", f"{E}.model_channels=32",
          f"{E}.channel_mult=[1,2]", f"{E}.num_res_blocks=1", f"{E}.attention_resolutions=[2,1]", f"{E}.num_heads=2",
          f"{E}.out_channels=32", f"{F}.ch=32", f"{F}.ch_mult=[1,2]", f"{F}.num_res_blocks=1",
          f"{P}.cond_stage_config.params.arch={{width: 32, layers: 2, heads: 2, embed_dim: 32}}"]
SMALL = dict(unet=dict(mc=32, mult=(1, 2), nrb=1, attn=(2, 1), context=32),
             vae=dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, embed_dim=4),
             clip=dict(width=32, layers=2, embed=32), encoder=dict(mc=32, mult=(1, 2), nrb=1, attn=(2, 1), out=32),
             semb=32)


@pytest.fixture(scope="module")
def released_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("stablesr") / "v2-finetune_text_T_512.yaml"
    path.write_text(yaml.safe_dump(RELEASED))
    return path


def meta_state_dict(shapes: dict) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()} | dict(SCHEDULE)


def count(shapes: dict, prefix: str, exclude: str | None = None) -> tuple[int, int]:
    keys = [k for k in shapes if k.startswith(prefix) and not (exclude and exclude in k)]
    return len(keys), sum(math.prod(shapes[k]) for k in keys)


# ---- SD 2.x ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, parameterization", [(V2, "eps"), (V2_V, "v")])
def test_sd2_configs_load_the_published_layout_strictly_full_size_on_meta(path, parameterization):
    with parameters_on_meta():
        model = build_model(path)                        # OpenCLIP built without weights: the file brings them
    shapes = sd2_layout()
    assert count(shapes, "model.diffusion_model.") == (686, 865_910_724)
    assert count(shapes, "first_stage_model.") == (248, 83_653_863)
    assert count(shapes, "cond_stage_model.model.") == (294, 354_032_641)      # OpenCLIP ViT-H-14 text tower
    report = load_weights(model, meta_state_dict(shapes))
    assert report.ok, report.describe(path, "LatentDiffusion")
    assert model.parameterization == parameterization and model.cond_stage_model.layer == "penultimate"
    assert type(model.cond_stage_model).__name__ == "FrozenOpenCLIPEmbedder"


# ---- StableSR's released YAML ----------------------------------------------------------------------------------------
def test_released_stablesr_yaml_loads_the_stablesr_layout_strictly_full_size_on_meta(released_yaml):
    with parameters_on_meta():
        model = build_model(released_yaml)
    shapes = stablesr_layout()
    assert count(shapes, "model.diffusion_model.", exclude=".spade.") == (686, 865_910_724)
    assert (len([k for k in shapes if ".spade." in k]),
            sum(math.prod(s) for k, s in shapes.items() if ".spade." in k)) == (176, 53_020_160)
    assert count(shapes, "structcond_stage_model.") == (200, 52_494_080)
    assert count(shapes, "first_stage_model.") == (248, 83_653_863)
    report = load_weights(model, meta_state_dict(shapes))
    assert report.ok, report.describe("stablesr", "StableSR")
    unet = model.model.diffusion_model
    assert type(model).__name__ == "StableSR" and type(unet).__name__ == "SFTUNetModel"
    assert unet.sft_form == "spade" and not unet.sft_zero_init and model.clip_denoised is False
    assert sum(p.numel() for p in model.trainable_parameters()) == 105_514_240        # 53.02M SFT + 52.49M encoder


def test_released_stablesr_yaml_shrunk_loads_real_numbers_and_super_resolves(released_yaml, tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.05 for k, s in stablesr_layout(**SMALL).items()} | dict(SCHEDULE)
    save_checkpoint_atomic({"state_dict": sd}, tmp_path / "stablesr.ckpt")
    model = load_model(released_yaml, tmp_path / "stablesr.ckpt", overrides=SHRINK)
    own = model.state_dict()
    assert own.keys() == sd.keys() and all(torch.equal(v, sd[k]) for k, v in own.items())
    lr = torch.rand(1, 3, 8, 8) * 2 - 1
    images = model.sample(model.lr_condition(lr), sampler="ddim", steps=2, eta=1.0)   # x4: 32 px, latents 4x4
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("change, message", [({"unfrozen_diff": True}, "unfrozen_diff"),
                                             ({"time_replace": 200}, "time_replace"),
                                             ({"p2_gamma": 1.0, "p2_k": 1.0}, "p2_gamma")])
def test_released_options_this_port_does_not_implement_are_errors(change, message):
    params = {"timesteps": 1000, "use_usm": True, "random_size": False, "time_replace": 1000} | change
    with pytest.raises(ConfigError, match=f"LatentDiffusionSRTextWT: .*{message}"):
        translate_params(SR, params)
    assert translate_params(SR, {"timesteps": 1000, "use_usm": True, "time_replace": 1000}) == {"timesteps": 1000}


# ---- an SD 2.1 base file into our StableSR config -------------------------------------------------------------------
def test_sd21_base_file_starts_our_stablesr_config(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = {k: torch.randn(s, generator=g) * 0.05 for k, s in sd2_layout(**{k: SMALL[k] for k in ("unet", "vae",
                                                                                                     "clip")}).items()}
    base |= dict(SCHEDULE) | {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(0)}
    save_checkpoint_atomic({"state_dict": base}, tmp_path / "v2-1_512-ema-pruned.ckpt")
    config = model_config(OURS, SHRINK + [f"{U}.use_checkpoint=false", f"{E}.use_checkpoint=false",
                                            f"{P}.ckpt_path={tmp_path / 'v2-1_512-ema-pruned.ckpt'}"])
    model = instantiate_from_config(config)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in base.items() if not k.startswith("model_ema."))
    trained = {k for k in own if ".spade." in k or k.startswith("structcond_stage_model.")}
    assert trained and not (trained & set(base))                       # SFT and encoder: initialised here
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n in trained}


def model_config(path: str, overrides: list[str]):
    return OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides)).model

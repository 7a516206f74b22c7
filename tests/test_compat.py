"""Original CompVis/SD configs and checkpoint layouts: the alias table, and load_model on SD 1.x, KL-f8 and VQ-f4.

State dicts are written from the published layout rules (REFERENCE.md §2) with the ORIGINAL key names: full-size
models are checked on the meta device (keys and shapes, no memory); shrunk models of the same structure check
the numbers.
"""
import inspect
import logging

import huggingface_hub.constants
import pytest
import torch
from omegaconf import OmegaConf

from ldm.callbacks import ImageLogger
from ldm.checkpoint import CheckpointMismatchError, save_checkpoint_atomic, save_safetensors
from ldm.compat import (ALIASES, is_original_target, native_config, original_targets_outside_model,
                        translate_params)
from ldm.data.datamodule import DataModuleFromConfig
from ldm.diffusion import make_schedule
from ldm.loading import build_model, load_model, load_weights
from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config
from tests.compvis_layouts import (autoencoder_layout, clip_folder, clip_layout,  # noqa: F401 (shared)
                                   make_tensor, parameters_on_meta)
from tests.test_unet import expected_unet_keys

SD1, KL_F8, VQ_F4 = "configs/compvis/v1-inference.yaml", "configs/compvis/kl-f8.yaml", "configs/compvis/vq-f4.yaml"
COND = "model.params.cond_stage_config.params"
UNET, VAE = "model.params.unet_config.params", "model.params.first_stage_config.params.ddconfig"
# same structure as SD 1.x, small: 2-level U-Net and autoencoder, 2-layer CLIP of width 32
SHRINK = [f"{UNET}.model_channels=32", f"{UNET}.channel_mult=[1,2]", f"{UNET}.num_res_blocks=1",
          f"{UNET}.attention_resolutions=[2,1]", f"{UNET}.context_dim=32", f"{UNET}.use_checkpoint=false",
          f"{VAE}.ch=32", f"{VAE}.ch_mult=[1,2]", f"{VAE}.num_res_blocks=1"]
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              vocab_size=49408, hidden_act="quick_gelu", projection_dim=768)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def sd1_file(model, unet, vae, clip, *, meta=False, ema=True, seed=0, **clip_naming):
    """An SD 1.x state dict with the published names: U-Net keys from the layout rules (shapes read from
    `model`), autoencoder and CLIP keys and shapes from the layout rules, the 12 schedule buffers."""
    g = torch.Generator().manual_seed(seed)
    unet_shapes = {k: tuple(v.shape) for k, v in model.model.diffusion_model.state_dict().items()}
    shapes = {f"model.diffusion_model.{k}": unet_shapes[k] for k in expected_unet_keys(**unet)}
    shapes |= {f"first_stage_model.{k}": s for k, s in autoencoder_layout(**vae).items()}
    shapes |= clip_layout(**clip, **clip_naming)
    sd = {k: make_tensor(k, s, meta, g) for k, s in shapes.items()}
    sd |= make_schedule("linear", 1000, 0.00085, 0.012).buffers()
    if ema:
        sd |= {"model_ema." + k[len("model."):].replace(".", ""): make_tensor(k, s, meta, g)
               for k, s in shapes.items() if k.startswith("model.")}
        sd |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(470000)}
    return sd


SD1_UNET = dict(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=2, attention_resolutions=[4, 2, 1])
SD1_VAE = dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4, embed_dim=4)
TINY_UNET = dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2, 1])
TINY_VAE = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, embed_dim=4)


# ---- the alias table ---------------------------------------------------------------------------------------------
DDPM_PARAMS = ["unet_config", "timesteps", "beta_schedule", "loss_type", "ckpt_path", "ignore_keys", "load_only_unet",
               "monitor", "use_ema", "first_stage_key", "image_size", "channels", "log_every_t", "clip_denoised",
               "linear_start", "linear_end", "cosine_s", "given_betas", "original_elbo_weight", "v_posterior",
               "l_simple_weight", "conditioning_key", "parameterization", "scheduler_config",
               "use_positional_encodings", "learn_logvar", "logvar_init"]
GAN_PARAMS = ["disc_start", "pixelloss_weight", "disc_num_layers", "disc_in_channels", "disc_factor", "disc_weight",
              "perceptual_weight", "use_actnorm", "disc_conditional", "disc_loss"]
KL_LOSS_PARAMS = GAN_PARAMS + ["logvar_init", "kl_weight"]
VQ_LOSS_PARAMS = GAN_PARAMS + ["codebook_weight", "disc_ndf", "n_classes", "perceptual_loss", "pixel_loss"]
# every parameter name of the original classes
ORIGINAL_PARAMS = {
    "ldm.models.diffusion.ddpm.DDPM": DDPM_PARAMS,
    "ldm.models.diffusion.ddpm.LatentDiffusion": DDPM_PARAMS + [
        "first_stage_config", "cond_stage_config", "num_timesteps_cond", "cond_stage_key", "cond_stage_trainable",
        "concat_mode", "cond_stage_forward", "scale_factor", "scale_by_std"],
    "ldm.lr_scheduler.LambdaWarmUpCosineScheduler": ["warm_up_steps", "lr_min", "lr_max", "lr_start",
                                                     "max_decay_steps", "verbosity_interval"],
    "ldm.lr_scheduler.LambdaWarmUpCosineScheduler2": ["warm_up_steps", "f_min", "f_max", "f_start", "cycle_lengths",
                                                      "verbosity_interval"],
    "ldm.lr_scheduler.LambdaLinearScheduler": ["warm_up_steps", "f_min", "f_max", "f_start", "cycle_lengths",
                                               "verbosity_interval"],
    "ldm.modules.diffusionmodules.openaimodel.UNetModel": [
        "image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
        "dropout", "channel_mult", "conv_resample", "dims", "num_classes", "use_checkpoint", "use_fp16", "num_heads",
        "num_head_channels", "num_heads_upsample", "use_scale_shift_norm", "resblock_updown",
        "use_new_attention_order", "use_spatial_transformer", "transformer_depth", "context_dim", "n_embed",
        "legacy"],
    "ldm.modules.diffusionmodules.model.Encoder": ["ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
                                                   "resamp_with_conv", "in_channels", "resolution", "z_channels",
                                                   "double_z", "use_linear_attn", "attn_type"],
    "ldm.modules.diffusionmodules.model.Decoder": ["ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                                                   "dropout", "resamp_with_conv", "in_channels", "resolution",
                                                   "z_channels", "give_pre_end", "tanh_out", "use_linear_attn",
                                                   "attn_type"],
    "ldm.modules.diffusionmodules.model.Decoder_Mix": ["ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                                                       "dropout", "resamp_with_conv", "in_channels", "resolution",
                                                       "z_channels", "give_pre_end", "tanh_out", "use_linear_attn",
                                                       "attn_type", "num_fuse_block", "fusion_w"],
    "ldm.models.autoencoder.AutoencoderKLResi": ["ddconfig", "lossconfig", "embed_dim", "ckpt_path", "ignore_keys",
                                                 "image_key", "colorize_nlabels", "monitor", "fusion_w", "freeze_dec",
                                                 "synthesis_data", "use_usm", "test_gt"],
    "ldm.modules.encoders.modules.ClassEmbedder": ["embed_dim", "n_classes", "key"],
    "ldm.modules.encoders.modules.BERTEmbedder": ["n_embed", "n_layer", "vocab_size", "max_seq_len", "device",
                                                  "use_tokenizer", "embedding_dropout"],
    "ldm.modules.encoders.modules.SpatialRescaler": ["n_stages", "method", "multiplier", "in_channels",
                                                     "out_channels", "bias"],
    "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder": ["arch", "version", "device", "max_length", "freeze",
                                                            "layer"],
    "ldm.models.diffusion.ddpm.LatentDiffusionSRTextWT": DDPM_PARAMS + [
        "first_stage_config", "cond_stage_config", "structcond_stage_config", "num_timesteps_cond", "cond_stage_key",
        "cond_stage_trainable", "concat_mode", "cond_stage_forward", "conditioning_key", "scale_factor",
        "scale_by_std", "unfrozen_diff", "random_size", "test_gt", "p2_gamma", "p2_k", "time_replace", "use_usm",
        "mix_ratio"],
    "ldm.modules.diffusionmodules.openaimodel.UNetModelDualcondV2": [
        "image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
        "dropout", "channel_mult", "conv_resample", "dims", "num_classes", "use_checkpoint", "use_fp16", "num_heads",
        "num_head_channels", "num_heads_upsample", "use_scale_shift_norm", "resblock_updown",
        "use_new_attention_order", "use_spatial_transformer", "transformer_depth", "context_dim", "n_embed",
        "legacy", "disable_self_attentions", "num_attention_blocks", "disable_middle_self_attn",
        "use_linear_in_transformer", "semb_channels"],
    "ldm.modules.diffusionmodules.openaimodel.EncoderUNetModelWT": [
        "image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
        "dropout", "channel_mult", "conv_resample", "dims", "use_checkpoint", "use_fp16", "num_heads",
        "num_head_channels", "num_heads_upsample", "use_scale_shift_norm", "resblock_updown",
        "use_new_attention_order"],
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder": ["version", "device", "max_length", "freeze", "layer",
                                                        "layer_idx"],
    "ldm.modules.losses.LPIPSWithDiscriminator": KL_LOSS_PARAMS,
    "ldm.modules.losses.contperceptual.LPIPSWithDiscriminator": KL_LOSS_PARAMS,
    "ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator": VQ_LOSS_PARAMS,
    "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator": VQ_LOSS_PARAMS,
    "ldm.modules.losses.contperceptual.DummyLoss": [],
    "ldm.modules.losses.vqperceptual.DummyLoss": [],
    "main.DataModuleFromConfig": ["batch_size", "train", "validation", "test", "predict", "wrap", "num_workers",
                                  "shuffle_test_loader", "use_worker_init_fn", "shuffle_val_dataloader"],
    "main.ImageLogger": ["batch_frequency", "max_images", "clamp", "increase_log_steps", "rescale", "disabled",
                         "log_on_batch_idx", "log_first_step", "log_images_kwargs"],
}


@pytest.mark.parametrize("path", sorted(ALIASES))
def test_every_alias_accepts_all_parameter_names_of_the_original(path):
    obj = get_obj_from_str(path)
    accepted = inspect.signature(obj).parameters
    assert [n for n in ORIGINAL_PARAMS[path] if n not in accepted] == []
    assert not is_original_target(ALIASES[path].target)                # each maps to one of ours


def test_unsupported_original_targets_are_named_and_ours_still_import():
    for path in ("ldm.models.diffusion.ddpm.LatentInpaintDiffusion",
                 "ldm.modules.encoders.modules.FrozenT5Embedder", "taming.models.vqgan.VQModel"):
        with pytest.raises(ConfigError, match=rf"{path}.*not supported.*FrozenCLIPEmbedder"):
            get_obj_from_str(path)
    assert get_obj_from_str("ldm.modules.diffusionmodules.unet.UNetModel").__name__ == "UNetModel"
    assert get_obj_from_str("ldm.models.autoencoder.VQModelInterface").__name__ == "VQModelInterface"


def test_dummy_loss_builds_for_inference_and_fails_training_by_name():
    """inpainting_big's first stage names CompVis' DummyLoss: it builds (no weights); training names it."""
    ddconfig = dict(double_z=False, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0, attn_type="none")
    dummy = "ldm.modules.losses.contperceptual.DummyLoss"
    model = instantiate_from_config({"target": "ldm.models.autoencoder.VQModelInterface", "params": {
        "embed_dim": 3, "n_embed": 16, "ddconfig": ddconfig, "lossconfig": {"target": dummy}}})
    assert not list(model.loss.parameters()) and model(torch.zeros(1, 3, 8, 8))[0].shape == (1, 3, 8, 8)
    with pytest.raises(ConfigError, match=rf"lossconfig target {dummy} has no training loss"):
        model.configure_optimizers()
    with pytest.raises(ConfigError, match=rf"{dummy} \(CompVis\) stands in for a part that only training uses"):
        model.loss(torch.zeros(1))
    with pytest.raises(ConfigError, match="original_target.*cannot be changed"):
        translate_params(dummy, {"original_target": "x"})


def test_spatial_rescaler_of_a_semantic_config_one_hot_encodes_label_maps():
    rescaler = "ldm.modules.encoders.modules.SpatialRescaler"
    assert translate_params(rescaler, {"n_stages": 2, "in_channels": 182, "out_channels": 3})["n_classes"] == 182
    assert "n_classes" not in translate_params(rescaler, {"in_channels": 3, "out_channels": 8})   # an RGB input
    model = instantiate_from_config({"target": rescaler, "params": {"n_stages": 2, "in_channels": 182,
                                                                    "out_channels": 3}})
    labels = torch.randint(0, 182, (1, 16, 16))
    one_hot = torch.nn.functional.one_hot(labels, 182).permute(0, 3, 1, 2).float()
    assert torch.equal(model(labels), model(one_hot)) and model(labels).shape == (1, 3, 4, 4)


def test_compvis_main_data_module_and_image_logger_translate():
    data = instantiate_from_config({"target": "main.DataModuleFromConfig", "params": {
        "batch_size": 3, "wrap": True, "use_worker_init_fn": True, "shuffle_val_dataloader": True,
        "train": {"target": "ldm.data.imagenet.ImageNetTrain", "params": {"config": {"size": 256}}}}})
    assert isinstance(data, DataModuleFromConfig) and data.num_workers == 6 and data.shuffle_val  # CompVis: 2 x batch
    with pytest.raises(ConfigError, match=r"'ldm.data.imagenet.ImageNetTrain' belongs to the original CompVis.*"
                                          r"ldm.data.image_folder.ImageFolder"):
        data.setup("fit")
    with pytest.raises(ConfigError, match="predict section is not supported"):
        translate_params("main.DataModuleFromConfig", {"batch_size": 1, "predict": {"target": "x"}})
    logger = instantiate_from_config({"target": "main.ImageLogger", "params": {
        "batch_frequency": 4, "max_images": 2, "rescale": True, "log_on_batch_idx": False}})
    assert isinstance(logger, ImageLogger) and logger.max_images == 2


def test_notes_for_original_targets_outside_the_model_section():
    config = OmegaConf.create({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion"}, "data": {
        "target": "main.DataModuleFromConfig", "params": {"train": {"target": "taming.data.faceshq.FFHQTrain"}}},
        "lightning": {"callbacks": {"log": {"target": "main.ImageLogger"}, "mine": {"target": "x.Y"}}}})
    assert original_targets_outside_model(config) == [
        "data.target=main.DataModuleFromConfig: mapped to ldm.data.datamodule.DataModuleFromConfig; not read for "
        "inference",
        "data.params.train.target=taming.data.faceshq.FFHQTrain: a data set of the original repositories; not read "
        "for inference",
        "lightning.callbacks.log.target=main.ImageLogger: mapped to ldm.callbacks.ImageLogger; not read for "
        "inference"]


def test_unconditional_ignores_a_conditioning_key_as_in_compvis():
    ddconfig = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    model = instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "ddconfig": ddconfig, "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": "__is_unconditional__", "conditioning_key": "crossattn", "image_size": 8,
        "timesteps": 10, "allow_random_first_stage": True, "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": dict(
            image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[],
            num_res_blocks=1, channel_mult=[1], num_heads=1)}}})
    assert model.conditioning_key is None and model.cond_stage_model is None
    assert model.sample(batch_size=1, steps=2).shape == (1, 3, 16, 16)


def test_frozen_clip_embedder_params_translate():
    clip = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    assert translate_params(clip, {"device": "cuda", "max_length": 77}) == {
        "version": "openai/clip-vit-large-patch14", "max_length": 77, "model_class": "clip",
        "tokenizer": "openai/clip-vit-large-patch14"}
    assert translate_params(clip, {"layer": "hidden", "layer_idx": -2})["layer"] == "penultimate"
    with pytest.raises(ConfigError, match="pooled"):
        translate_params(clip, {"layer": "pooled"})
    with pytest.raises(ConfigError, match="model_class.*cannot be changed"):
        translate_params(clip, {"model_class": "auto"})
    with pytest.raises(ConfigError, match=r"max_len \(did you mean 'max_length'"):
        instantiate_from_config({"target": clip, "params": {"max_len": 10}}, where="cond_stage_config")


def test_tiny_frozen_clip_embedder_builds_from_a_local_folder(tmp_path):
    folder = clip_folder(tmp_path, weights=False, **TINY_CLIP)
    emb = instantiate_from_config({"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                   "params": {"version": folder, "device": "cuda", "pretrained": False}})
    assert type(emb).__name__ == "FrozenTextEmbedder" and emb(["a cat"]).shape == (1, 77, 32)
    assert emb.tokenizer.__class__.__name__ == "CLIPTokenizer"        # the folder's, not the MiniLM default


def test_bert_embedder_and_lambda_scheduler_build_from_original_params():
    bert = instantiate_from_config({"target": "ldm.modules.encoders.modules.BERTEmbedder",
                                    "params": {"n_embed": 16, "n_layer": 1, "vocab_size": 50, "max_seq_len": 6,
                                               "device": "cuda", "use_tokenizer": False}})
    assert bert(torch.randint(0, 50, (2, 6))).shape == (2, 6, 16)
    schedule = instantiate_from_config({"target": "ldm.lr_scheduler.LambdaLinearScheduler", "params": {
        "warm_up_steps": [10], "cycle_lengths": [1000], "f_start": [1e-6], "f_max": [1.0], "f_min": [1.0]}})
    assert schedule(0) == pytest.approx(1e-6) and schedule(5) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("path", [SD1, KL_F8, VQ_F4])
def test_native_config_names_only_our_classes(path):
    native = native_config(OmegaConf.load(path).model)
    targets = []

    def walk(node):
        if isinstance(node, dict):
            targets.extend([node["target"]] if "target" in node else [])
            [walk(v) for v in node.values()]

    walk(native)
    assert targets and not any(is_original_target(t) for t in targets)
    assert all(get_obj_from_str(t) for t in targets)
    if path == SD1:
        assert native["params"]["cond_stage_config"]["params"]["model_class"] == "clip"


# ---- SD 1.x, full size, on the meta device -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd1_meta(tmp_path_factory):
    folder = clip_folder(tmp_path_factory.mktemp("clip_l"), weights=False, **CLIP_L)
    with parameters_on_meta():
        return build_model(SD1, overrides=[f"{COND}.version={folder}", f"{COND}.pretrained=false"])


@pytest.mark.parametrize("ema, use_ema, naming", [
    (True, True, {}), (True, False, {}), (False, True, {}),            # full file; EMA-only file
    (True, True, {"text_model": False, "position_ids": False})])     # saved with transformers >= 5
def test_sd1_published_layout_loads_strictly_into_the_original_yaml_model(sd1_meta, ema, use_ema, naming):
    sd = sd1_file(sd1_meta, SD1_UNET, SD1_VAE, CLIP_L, meta=True, ema=ema, **naming)
    assert len(sd) == 1143 - (0 if naming.get("position_ids", True) else 1) + (686 + 2 if ema else 0)
    params = {part: sum(v.numel() for k, v in sd.items() if k.startswith(part) and "position_ids" not in k)
              for part in ("model.", "first_stage_model.", "cond_stage_model.")}
    assert params == {"model.": 859_520_964, "first_stage_model.": 83_653_863, "cond_stage_model.": 123_060_480}
    report = load_weights(sd1_meta, sd, use_ema=use_ema)
    assert report.ok, report.describe("sd1", "LatentDiffusion")
    notes = " | ".join(report.notes)
    if ema:
        assert ("686 weights under model.* replaced by their EMA copies (model_ema.*, 470000 updates)" if use_ema
                else "688 model_ema.* keys dropped") in notes
    else:
        assert "EMA-only" in notes
    if not naming:
        assert "196 key(s) renamed to the model's layout" in notes
        assert "1 key(s) of the file not used, by rule of FrozenTextEmbedder (cond_stage_model.*)" in notes
        assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in notes


def test_load_model_names_bad_inputs(tmp_path):
    save_checkpoint_atomic({"state_dict": {}}, tmp_path / "empty.ckpt")
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_model(SD1, tmp_path / "nowhere.ckpt")
    with pytest.raises(FileNotFoundError, match="config file .*nowhere.yaml"):
        load_model(tmp_path / "nowhere.yaml", tmp_path / "empty.ckpt")
    with pytest.raises(ConfigError, match="no model.target"):
        load_model({"data": {}}, tmp_path / "empty.ckpt")
    with parameters_on_meta(), pytest.raises(OSError, match="openai/clip-vit-large-patch14.*local folder"):
        build_model(SD1)                                                # offline, CLIP neither cached nor local


# ---- SD 1.x, shrunk, real numbers --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """(overrides, reference model for U-Net shapes, full file with EMA, folder for files)."""
    folder = clip_folder(tmp_path_factory.mktemp("clip_tiny"), weights=True, **TINY_CLIP)
    overrides = SHRINK + [f"{COND}.version={folder}"]
    reference = build_model(SD1, overrides=overrides)
    return overrides, reference, tmp_path_factory.mktemp("files")


def unet_of(model):
    return model.model.diffusion_model.state_dict()


def test_shrunk_sd1_ckpt_and_safetensors_load_identical_ema_weights(tiny_sd, caplog):
    overrides, reference, files = tiny_sd
    sd = sd1_file(reference, TINY_UNET, TINY_VAE, TINY_CLIP)
    save_checkpoint_atomic({"state_dict": sd, "global_step": 7}, files / "sd.ckpt")
    save_safetensors(sd, files / "sd.safetensors")
    with caplog.at_level(logging.INFO, logger="ldm"):
        a = load_model(SD1, files / "sd.ckpt", overrides=overrides)
    b = load_model(SD1, files / "sd.safetensors", overrides=overrides)
    assert not a.training and type(a).__name__ == "LatentDiffusion"
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(v, sd_b[k]) for k, v in sd_a.items())
    for k, v in unet_of(a).items():                                    # use_ema=True by default
        assert torch.equal(v, sd["model_ema.diffusion_model" + k.replace(".", "")])
    for k, v in a.first_stage_model.state_dict().items():
        assert torch.equal(v, sd[f"first_stage_model.{k}"])
    clip = a.cond_stage_model.transformer.state_dict()                 # every CLIP weight came from the file
    assert len(clip) == 2 + 16 * 2 + 2
    for k, v in clip.items():
        assert torch.equal(v, sd[f"cond_stage_model.transformer.text_model.{k}"])
    assert torch.equal(a.alphas_cumprod, sd["alphas_cumprod"]) and a.scale_factor == 0.18215
    assert f"use_ema=True: {len(unet_of(a))} weights under model.*" in caplog.text
    assert "not used, by rule of FrozenTextEmbedder" in caplog.text and "position_ids" in caplog.text
    assert a.get_learned_conditioning(["a cat"]).shape == (1, 77, 32)


def test_shrunk_sd1_training_weights_ema_only_files_and_new_clip_naming(tiny_sd):
    overrides, reference, files = tiny_sd
    full = sd1_file(reference, TINY_UNET, TINY_VAE, TINY_CLIP, seed=1)
    save_safetensors(full, files / "full.safetensors")
    plain = load_model(SD1, files / "full.safetensors", use_ema=False, overrides=overrides)
    assert all(torch.equal(v, full[f"model.diffusion_model.{k}"]) for k, v in unet_of(plain).items())
    ema_only = sd1_file(reference, TINY_UNET, TINY_VAE, TINY_CLIP, ema=False, seed=2, text_model=False,
                        position_ids=False)
    save_safetensors(ema_only, files / "ema-only.safetensors")
    model = load_model(SD1, files / "ema-only.safetensors", use_ema=True, overrides=overrides)
    assert all(torch.equal(v, ema_only[f"model.diffusion_model.{k}"]) for k, v in unet_of(model).items())
    for k, v in model.cond_stage_model.transformer.state_dict().items():
        assert torch.equal(v, ema_only[f"cond_stage_model.transformer.{k}"])


@pytest.mark.parametrize("change, message", [
    ("missing", r"(?s)\d+ missing key\(s\).*first_stage_model\.decoder\.up\.\*: 8 missing \(e\.g\. "
                r"first_stage_model\.decoder\.up\.1\.block\.0\.norm1\.weight\)"),
    ("extra", r"(?s)1 unexpected key\(s\).*model\.diffusion_model\.extra_head\.weight"),
    ("shape", r"model\.diffusion_model\.out\.2\.weight: file \(8, 32, 3, 3\), model \(4, 32, 3, 3\)")])
def test_shrunk_sd1_mismatches_are_reported(tiny_sd, change, message):
    overrides, reference, files = tiny_sd
    sd = sd1_file(reference, TINY_UNET, TINY_VAE, TINY_CLIP, ema=False)
    if change == "missing":
        sd = {k: v for k, v in sd.items() if not k.startswith("first_stage_model.decoder.up.1.block.0.")}
    elif change == "extra":
        sd["model.diffusion_model.extra_head.weight"] = torch.zeros(3)
    else:
        sd["model.diffusion_model.out.2.weight"] = torch.zeros(8, 32, 3, 3)
    save_checkpoint_atomic({"state_dict": sd}, files / f"{change}.ckpt")
    with pytest.raises(CheckpointMismatchError, match=message) as info:
        load_model(SD1, files / f"{change}.ckpt", overrides=overrides)
    assert f"{change}.ckpt" in str(info.value) and "does not fit LatentDiffusion" in str(info.value)


def test_first_stage_conditioner_duplicate_loads_with_one_or_both_copies(tmp_path):
    """CompVis files of `__is_first_stage__` models hold the autoencoder twice; deduplicating converters keep one."""
    ddconfig = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    unet = dict(image_size=8, in_channels=8, out_channels=4, model_channels=32, attention_resolutions=[],
                num_res_blocks=1, channel_mult=[1], num_heads=1)
    config = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "ddconfig": ddconfig, "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": "__is_first_stage__", "conditioning_key": "concat", "image_size": 8, "timesteps": 10,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet}}}}
    g = torch.Generator().manual_seed(0)
    both = {f"first_stage_model.{k}": torch.randn(s, generator=g)
            for k, s in autoencoder_layout(**TINY_VAE).items()}
    both |= {k.replace("first_stage_model.", "cond_stage_model.", 1): v for k, v in both.items()}
    both |= {k: torch.randn(v.shape, generator=g) for k, v in build_model(config).state_dict().items()
             if k.startswith("model.") or "." not in k}
    one = {k: v for k, v in both.items() if not k.startswith("cond_stage_model.")}
    for name, sd in (("both", both), ("one", one)):
        save_safetensors(sd, tmp_path / f"{name}.safetensors")
        model = load_model(config, tmp_path / f"{name}.safetensors")
        assert model.cond_stage_model is model.first_stage_model
        conv_out = model.first_stage_model.decoder.conv_out.weight
        assert torch.equal(conv_out, both["first_stage_model.decoder.conv_out.weight"])


# ---- first stages: KL-f8 and VQ-f4 from their original YAML ------------------------------------------------------
FIRST_STAGES = {KL_F8: dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4, embed_dim=4),
                VQ_F4: dict(ch=128, ch_mult=[1, 2, 4], num_res_blocks=2, z_channels=3, embed_dim=3, double_z=False,
                            n_embed=8192)}
TRAINING_LOSS = {"loss.logvar": (), "loss.perceptual_loss.net.slice1.0.weight": (64, 3, 3, 3),
                 "loss.perceptual_loss.lin0.model.1.weight": (1, 64, 1, 1), "loss.discriminator.main.0.weight":
                 (64, 3, 4, 4)}


@pytest.mark.parametrize("path", [KL_F8, VQ_F4])
def test_first_stage_layout_loads_strictly_full_size_on_meta(path):
    with parameters_on_meta():
        model = build_model(path)
    shapes = autoencoder_layout(**FIRST_STAGES[path]) | TRAINING_LOSS
    report = load_weights(model, {k: torch.empty(s, device="meta") for k, s in shapes.items()})
    assert report.ok, report.describe(path, type(model).__name__)
    assert any("4 loss.* key(s) dropped" in n for n in report.notes)
    if path == KL_F8:
        assert sum(torch.Size(s).numel() for k, s in shapes.items() if not k.startswith("loss.")) == 83_653_863


@pytest.mark.parametrize("path", [KL_F8, VQ_F4])
def test_shrunk_first_stage_loads_from_the_original_yaml(path, tmp_path, caplog):
    layout = FIRST_STAGES[path] | dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, n_embed=16 if path == VQ_F4 else None)
    overrides = ["model.params.ddconfig.ch=32", "model.params.ddconfig.ch_mult=[1,2]",
                 "model.params.ddconfig.num_res_blocks=1"] + (["model.params.n_embed=16"] if path == VQ_F4 else [])
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in (autoencoder_layout(**layout) | TRAINING_LOSS).items()}
    save_checkpoint_atomic({"state_dict": sd}, tmp_path / "model.ckpt")
    with caplog.at_level(logging.INFO, logger="ldm"):
        model = load_model(path, tmp_path / "model.ckpt", overrides=overrides)
    assert type(model).__name__ == ("AutoencoderKL" if path == KL_F8 else "VQModel")
    own = {k: v for k, v in model.state_dict().items() if k != "quantize.steps_unused"}
    assert own.keys() == {k for k in sd if not k.startswith("loss.")}
    assert all(torch.equal(v, sd[k]) for k, v in own.items())
    assert "lossconfig" in caplog.text and "4 loss.* key(s) dropped" in caplog.text
    assert model.decode(torch.zeros(1, layout["embed_dim"], 4, 4)).shape == (1, 3, 8, 8)

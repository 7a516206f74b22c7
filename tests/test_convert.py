"""ldm <-> diffusers conversion (ldm/convert, scripts/convert.py) on tiny random models, CPU, fp32.

diffusers -> ours: the same inputs give the same U-Net noise prediction / autoencoder encode-decode (max abs
difference <= 1e-5); ours -> diffusers gives back the original state dict bit for bit. Our own checkpoints travel
through safetensors and through a diffusers pipeline folder and come back bit-exact.
"""
import importlib.util
import json
import pathlib

import huggingface_hub.constants
import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import read_state_dict, save_checkpoint_atomic
from ldm.convert import components as comp
from ldm.convert.keymap import ConversionError, shapes
from ldm.convert.pipeline import diffusers_to_ldm, ldm_to_diffusers
from ldm.convert.unet import unet_from_diffusers
from ldm.loading import build_model, load_model
from ldm.util import instantiate_from_config
from tests.test_compat import SD1, SHRINK, TINY_CLIP, TINY_UNET, TINY_VAE, clip_folder, sd1_file

diffusers = pytest.importorskip("diffusers")
REPO = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-5


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REPORT = script("convert_roundtrip_report")
randomized = REPORT.randomized          # every parameter ~ N(0, 0.1^2) (no zero-initialised branches), eval mode


def convert_cli(*argv):
    return script("convert").main([str(a) for a in argv])


def config_of(model):
    return {"_class_name": type(model).__name__, **model.config}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---- one network at a time ---------------------------------------------------------------------------------------
UNET_COND = {
    "sd1": dict(layers_per_block=1, block_out_channels=(32, 64), attention_head_dim=2, cross_attention_dim=16,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",
                                                                                          "CrossAttnUpBlock2D")),
    "sd2": dict(layers_per_block=(1, 2), block_out_channels=(32, 64), attention_head_dim=(2, 4), cross_attention_dim=16,
                use_linear_projection=True, transformer_layers_per_block=2, num_class_embeds=3,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D",
                                                                                          "UpBlock2D")),
    "groups8": dict(layers_per_block=1, block_out_channels=(32, 64), attention_head_dim=2, cross_attention_dim=16,
                    norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))}


@pytest.mark.parametrize("variant", sorted(UNET_COND))
def test_unet2d_condition_model_gives_the_same_noise_prediction_and_converts_back_bit_exact(variant):
    theirs = randomized(diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                                       **UNET_COND[variant]))
    params, sd = comp.unet_from_component(config_of(theirs), theirs.state_dict(), "unet")
    ours = randomized(instantiate_from_config({"target": comp.UNET_TARGET, "params": params}), seed=1)
    ours.load_state_dict(sd, strict=True)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 16)
    y = torch.tensor([0, 2]) if "num_class_embeds" in UNET_COND[variant] else None
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=context, class_labels=y).sample
        assert max_diff(ours(x, t, context=context, y=y), expected) <= TOL
    back = comp.unet_to_component(params, ours.state_dict(), "ours")
    assert same(back.state_dict, theirs.state_dict())
    rebuilt = diffusers.UNet2DConditionModel.from_config(back.config)     # the derived config builds the same net
    assert shapes(rebuilt.state_dict()) == shapes(theirs.state_dict())


@pytest.mark.parametrize("new_order", [False, True])
def test_unet2d_model_class_conditional_gives_the_same_noise_prediction(new_order):
    theirs = randomized(diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16, num_class_embeds=5, resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32))
    params, _ = comp.unet_from_component(config_of(theirs), theirs.state_dict(), "unet")
    params["use_new_attention_order"] = new_order                   # both qkv channel orders of AttentionBlock
    ours = instantiate_from_config({"target": comp.UNET_TARGET, "params": params}).eval()
    ours.load_state_dict(unet_from_diffusers(theirs.state_dict(), params), strict=True)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 999]), torch.tensor([4, 0])
    with torch.no_grad():
        assert max_diff(ours(x, t, y=y), theirs(x, t, class_labels=y).sample) <= TOL
    assert same(comp.unet_to_component(params, ours.state_dict(), "ours").state_dict, theirs.state_dict())


def first_stage(kind):
    if kind == "kl":
        return randomized(diffusers.AutoencoderKL(latent_channels=4, **REPORT.BLOCKS))
    return randomized(diffusers.VQModel(latent_channels=3, vq_embed_dim=4, num_vq_embeddings=16, **REPORT.BLOCKS))


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_autoencoder_encode_decode_match_and_convert_back_bit_exact(kind):
    theirs = first_stage(kind)
    target, params, sd, scaling = comp.first_stage_from_component(config_of(theirs), theirs.state_dict(), "vae")
    ours = instantiate_from_config({"target": target, "params": params}).eval()
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        if kind == "kl":
            a, b = theirs.encode(x).latent_dist, ours.encode(x)
            assert max(max_diff(a.mean, b.mean), max_diff(a.logvar, b.logvar)) <= TOL
            z = a.mean
            assert max_diff(ours.decode(z), theirs.decode(z).sample) <= TOL
        else:
            h = theirs.encode(x).latents
            assert max_diff(ours.encode(x, return_pre_quant=True), h) <= TOL
            assert max_diff(ours.decode(ours.quantize(h)[0]), theirs.decode(h).sample) <= TOL
    back = comp.first_stage_to_component(target, params, ours.state_dict(), scaling, "ours")
    assert same(back.state_dict, theirs.state_dict()) and back.config["_class_name"] == type(theirs).__name__


# ---- whole checkpoints through scripts/convert.py ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd_files(tmp_path_factory):
    """A shrunk SD 1.x file with the published names (EMA, old CLIP naming) and its config as one YAML."""
    root = tmp_path_factory.mktemp("sd")
    (root / "clip").mkdir()
    clip = clip_folder(root / "clip", weights=True, **TINY_CLIP)
    overrides = SHRINK + [f"model.params.cond_stage_config.params.version={clip}"]
    config = OmegaConf.merge(OmegaConf.load(SD1), OmegaConf.from_dotlist(overrides))
    OmegaConf.save(config, root / "tiny-v1.yaml")
    reference = build_model(config)
    save_checkpoint_atomic({"state_dict": sd1_file(reference, TINY_UNET, TINY_VAE, TINY_CLIP)}, root / "sd.ckpt")
    return root


def test_sd1_checkpoint_to_a_diffusers_pipeline_and_back(tiny_sd_files):
    root = tiny_sd_files
    assert convert_cli("--to", "diffusers", "--config", root / "tiny-v1.yaml", "--ckpt", root / "sd.ckpt",
                       "--out", root / "pipe") == 0
    index = json.loads((root / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(root / "pipe", safety_checker=None)
    ours = load_model(root / "tiny-v1.yaml", root / "sd.ckpt")                # EMA weights, as converted
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([250]), torch.randn(1, 77, 32)
    with torch.no_grad():
        noise = ours.model.diffusion_model(x, t, context=context)
        assert max_diff(noise, pipe.unet(x, t, encoder_hidden_states=context).sample) <= TOL
        assert max_diff(ours.first_stage_model.decode(x), pipe.vae.decode(x).sample) <= TOL
        ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        theirs_text = pipe.text_encoder(ids).last_hidden_state
        assert max_diff(ours.get_learned_conditioning(["a cat"]), theirs_text) <= TOL
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    # and back: the same weights, loadable strictly with the written config
    for name in ("back.safetensors", "back.ckpt"):
        assert convert_cli("--to", "ldm", "--diffusers", root / "pipe", "--out", root / name) == 0
        back = load_model(root / "back.yaml", root / name)
        assert same(back.state_dict(), ours.state_dict())
    assert convert_cli("--to", "diffusers", "--config", root / "back.yaml", "--ckpt", root / "back.safetensors",
                       "--out", root / "pipe2") == 0
    for part, weights in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                          ("text_encoder", "model")):
        assert same(read_state_dict(root / "pipe2" / part / f"{weights}.safetensors"),
                    read_state_dict(root / "pipe" / part / f"{weights}.safetensors"))


def test_our_checkpoint_through_safetensors_is_bit_exact(tiny_sd_files, tmp_path):
    original = read_state_dict(tiny_sd_files / "sd.ckpt")
    assert convert_cli("--to", "safetensors", "--ckpt", tiny_sd_files / "sd.ckpt", "--out", tmp_path / "x.safetensors") == 0
    assert convert_cli("--to", "ckpt", "--ckpt", tmp_path / "x.safetensors", "--out", tmp_path / "x.ckpt") == 0
    assert same(read_state_dict(tmp_path / "x.safetensors"), original)
    assert same(read_state_dict(tmp_path / "x.ckpt"), original)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_first_stage_checkpoint_to_a_diffusers_model_folder_and_back(kind, tmp_path):
    theirs = first_stage(kind)
    theirs.save_pretrained(tmp_path / "theirs")
    assert convert_cli("--to", "ldm", "--diffusers", tmp_path / "theirs", "--out", tmp_path / "ours.ckpt") == 0
    model = load_model(tmp_path / "ours.yaml", tmp_path / "ours.ckpt")
    assert type(model).__name__ == ("AutoencoderKL" if kind == "kl" else "VQModel")
    assert convert_cli("--to", "diffusers", "--config", tmp_path / "ours.yaml", "--ckpt", tmp_path / "ours.ckpt",
                       "--out", tmp_path / "again") == 0
    again = type(theirs).from_pretrained(tmp_path / "again")
    assert same(again.state_dict(), theirs.state_dict())


def test_unconditional_ldm_and_ddpm_pipelines_round_trip(tmp_path):
    unet = randomized(diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                            block_out_channels=(32, 64), attention_head_dim=32,
                                            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                            up_block_types=("AttnUpBlock2D", "UpBlock2D")))
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195)
    diffusers.LDMPipeline(vqvae=first_stage("vq"), unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "ldm")
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")) \
        .save_pretrained(tmp_path / "ddpm")
    for name, target in (("ldm", "LatentDiffusion"), ("ddpm", "DDPM")):
        assert convert_cli("--to", "ldm", "--diffusers", tmp_path / name, "--out", tmp_path / f"{name}.safetensors") == 0
        model = load_model(tmp_path / f"{name}.yaml", tmp_path / f"{name}.safetensors")
        assert type(model).__name__ == target
        assert convert_cli("--to", "diffusers", "--config", tmp_path / f"{name}.yaml", "--ckpt",
                           tmp_path / f"{name}.safetensors", "--out", tmp_path / f"{name}2") == 0
        pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / f"{name}2")
        assert same(pipe.unet.state_dict(), unet.state_dict())
        assert torch.allclose(pipe.scheduler.alphas_cumprod, model.alphas_cumprod.to(torch.float32), atol=1e-6)


# ---- errors ------------------------------------------------------------------------------------------------------
def test_bad_inputs_are_named_with_file_and_key(tiny_sd_files, tmp_path, capsys):
    root = tiny_sd_files
    assert convert_cli("--to", "diffusers", "--config", root / "tiny-v1.yaml", "--ckpt", tmp_path / "none.ckpt",
                       "--out", tmp_path / "o") == 2
    assert "none.ckpt" in capsys.readouterr().err
    sd = read_state_dict(root / "sd.ckpt")
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    save_checkpoint_atomic({"state_dict": sd}, tmp_path / "extra.ckpt")
    assert convert_cli("--to", "diffusers", "--config", root / "tiny-v1.yaml", "--ckpt", tmp_path / "extra.ckpt",
                       "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "extra.ckpt" in err and "model.diffusion_model.extra.weight" in err
    theirs = first_stage("kl")
    theirs.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "latent_channels": 8}))
    with pytest.raises(ConversionError) as err:
        diffusers_to_ldm(tmp_path / "vae", str(tmp_path / "v.ckpt"))
    assert "vae/diffusion_pytorch_model.safetensors" in str(err.value)
    assert "encoder.conv_out.weight: file (8, 64, 3, 3), model (16, 64, 3, 3)" in str(err.value)
    with pytest.raises(ConversionError, match="model.target 'torch.nn.Identity' has no diffusers counterpart"):
        ldm_to_diffusers({"model": {"target": "torch.nn.Identity"}}, root / "sd.ckpt", str(tmp_path / "o"))


def test_unsafe_pickle_is_refused_unless_opted_in(tmp_path, capsys):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": pathlib.PurePosixPath("x")}, tmp_path / "p.ckpt")
    assert convert_cli("--to", "safetensors", "--ckpt", tmp_path / "p.ckpt", "--out", tmp_path / "p.safetensors") == 2
    assert "--unsafe-pickle" in capsys.readouterr().err
    assert convert_cli("--to", "safetensors", "--ckpt", tmp_path / "p.ckpt", "--out", tmp_path / "p.safetensors",
                       "--unsafe-pickle") == 0


def test_autoencoder_settings_without_a_diffusers_counterpart_are_named():
    from ldm.convert.vae import check_ddconfig
    dd = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "resolution": 16}
    assert check_ddconfig(dd, "x.yaml")["norm_type"] == "group"
    with pytest.raises(ConversionError, match=r"x.yaml: ddconfig setting\(s\) \{'norm_type': 'none'\}"):
        check_ddconfig({**dd, "norm_type": "none"}, "x.yaml")

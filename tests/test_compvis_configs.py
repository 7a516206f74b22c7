"""Every published configuration of CompVis/latent-diffusion and CompVis/stable-diffusion loads, as a user brings it.

The YAML files under tests/data/compvis/ are the original files, transcribed unchanged (hyper-parameters, data and
lightning sections, comments): latent-diffusion's configs/ and models/**/config.yaml, stable-diffusion's
configs/stable-diffusion/v1-inference.yaml. CONFIGS below lists every one with the overrides its tiny test copy
needs (widths only, for memory). For each file:
- every `target:` of it resolves (model parts; data module, callbacks), trainer keys are valid, and its data sets
  of the original repositories fail by name only when training builds them;
- at full size, on the meta device, a state dict with the published keys and shapes loads strictly, the keys
  derived by rule from the ORIGINAL architecture (tests/compvis_layouts.py), not from our modules;
- shrunk by the overrides, a file of random tensors with those keys loads strictly through `ldm.load_model`,
  every weight arrives where it belongs, the log reports the rules applied, and the model samples.
"""
import logging
import pathlib
import re

import huggingface_hub.constants
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm import cli
from ldm.callbacks import ImageLogger
from ldm.checkpoint import save_checkpoint_atomic, save_safetensors
from ldm.compat import is_original_data
from ldm.data.datamodule import DataModuleFromConfig
from ldm.diffusion import make_schedule
from ldm.loading import build_model, load_model, load_weights, model_section
from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config
from tests.compvis_layouts import (SCHEDULE_BUFFERS, checkpoint_layout, clip_folder, count, make_tensor,
                                   parameters_on_meta)
from tests.test_sample_script import pixels, run_script

DATA = pathlib.Path(__file__).parent / "data" / "compvis"
UNET, FIRST, COND = ("model.params.unet_config.params", "model.params.first_stage_config.params.ddconfig",
                     "model.params.cond_stage_config.params")
AE = ("model.params.ddconfig.ch=32",)                                   # first stage: width 128 -> 32
LDM = (f"{UNET}.model_channels=32", f"{FIRST}.ch=32")                  # U-Net and its first stage
TEXT = LDM + (f"{UNET}.context_dim=32", f"{COND}.n_embed=32")          # + the BERT width (32 layers kept)
LD, SD = "latent-diffusion/", "stable-diffusion/"
# every covered file -> its tiny overrides (memory only; all other hyper-parameters as published)
CONFIGS = {
    f"{LD}configs/autoencoder/autoencoder_kl_8x8x64.yaml": AE,
    f"{LD}configs/autoencoder/autoencoder_kl_16x16x16.yaml": AE,
    f"{LD}configs/autoencoder/autoencoder_kl_32x32x4.yaml": AE,
    f"{LD}configs/autoencoder/autoencoder_kl_64x64x3.yaml": AE,
    f"{LD}configs/latent-diffusion/celebahq-ldm-vq-4.yaml": LDM,
    f"{LD}configs/latent-diffusion/cin-ldm-vq-f8.yaml": LDM,
    f"{LD}configs/latent-diffusion/cin256-v2.yaml": LDM,
    f"{LD}configs/latent-diffusion/ffhq-ldm-vq-4.yaml": LDM,
    f"{LD}configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml": LDM,
    f"{LD}configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml": LDM,
    f"{LD}configs/latent-diffusion/txt2img-1p4B-eval.yaml": TEXT,
    f"{LD}configs/retrieval-augmented-diffusion/768x768.yaml": LDM,
    **{f"{LD}models/first_stage_models/{name}/config.yaml": AE
       for name in ("kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4", "vq-f4-noattn", "vq-f8", "vq-f8-n256", "vq-f16")},
    f"{LD}models/ldm/bsr_sr/config.yaml": LDM,
    f"{LD}models/ldm/celeba256/config.yaml": LDM,
    f"{LD}models/ldm/cin256/config.yaml": LDM,
    f"{LD}models/ldm/ffhq256/config.yaml": LDM,
    f"{LD}models/ldm/inpainting_big/config.yaml": LDM,
    f"{LD}models/ldm/layout2img-openimages256/config.yaml": TEXT,
    f"{LD}models/ldm/lsun_beds256/config.yaml": LDM,
    f"{LD}models/ldm/lsun_churches256/config.yaml": LDM,
    f"{LD}models/ldm/semantic_synthesis256/config.yaml": LDM,
    f"{LD}models/ldm/semantic_synthesis512/config.yaml": LDM,
    f"{LD}models/ldm/text2img256/config.yaml": TEXT,
    f"{SD}configs/stable-diffusion/v1-inference.yaml": LDM + (f"{UNET}.context_dim=32",),  # + a tiny CLIP folder
}
NAMES = sorted(CONFIGS)
# SD's CLIP text encoder cannot be downloaded: its config (full size) or a tiny one, from a local folder
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              vocab_size=49408, hidden_act="quick_gelu", projection_dim=768)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    return {"full": clip_folder(tmp_path_factory.mktemp("clip_l"), weights=False, **CLIP_L),
            "tiny": clip_folder(tmp_path_factory.mktemp("clip_tiny"), weights=True, **TINY_CLIP)}


def clip_overrides(name: str, folder: str, pretrained: bool) -> list[str]:
    if "FrozenCLIPEmbedder" not in (DATA / name).read_text():
        return []
    return [f"{COND}.version={folder}"] + ([] if pretrained else [f"{COND}.pretrained=false"])


def model_config(name: str, overrides: list[str]) -> dict:
    return OmegaConf.to_container(model_section(DATA / name, overrides), resolve=True)


def targets(node, where=""):
    """(where, target) of every `target:` in a config tree."""
    if isinstance(node, dict):
        if isinstance(node.get("target"), str):
            yield where, node["target"]
        for key, value in node.items():
            yield from targets(value, f"{where}.{key}" if where else key)


# ---- the table and every target ----------------------------------------------------------------------------------
def test_the_table_covers_every_transcribed_file():
    on_disk = sorted(str(p.relative_to(DATA)) for p in DATA.rglob("*.yaml"))
    assert on_disk == NAMES and len(NAMES) == 33


@pytest.mark.parametrize("name", NAMES)
def test_every_target_resolves_and_original_data_sets_fail_only_when_built(name):
    config = OmegaConf.to_container(OmegaConf.load(DATA / name), resolve=True)
    for where, target in targets(config):
        assert get_obj_from_str(target) is not None, where          # model parts, data module, callbacks
    if "data" in config:
        data = instantiate_from_config(config["data"], where="data")
        assert isinstance(data, DataModuleFromConfig)
        train = config["data"]["params"]["train"]["target"]
        assert is_original_data(train)
        with pytest.raises(ConfigError, match=rf"data set '{re.escape(train)}' belongs to the original CompVis"):
            data.setup("fit")                                         # what training would do
    lightning = config.get("lightning", {})
    for callback in (lightning.get("callbacks") or {}).values():
        assert isinstance(instantiate_from_config(callback), ImageLogger)
    cli.check_trainer_kwargs(dict(lightning.get("trainer") or {}), pl.Trainer)


# ---- full size, on the meta device -------------------------------------------------------------------------------
def meta_file(layout: dict, config: dict) -> dict[str, torch.Tensor]:
    """Meta tensors for the weights; real ones for the schedule buffers and scalars (read by the loader)."""
    sd = {k: make_tensor(k, s, meta=s != (), g=None) for k, s in layout.items()}
    if config["target"].endswith("LatentDiffusion"):
        p = config["params"]
        buffers = make_schedule("linear", p.get("timesteps", 1000), p["linear_start"], p["linear_end"]).buffers()
        sd |= {k: buffers[k] for k in SCHEDULE_BUFFERS}
    return sd


@pytest.mark.parametrize("name", NAMES)
def test_full_size_published_layout_loads_strictly(name, clip_folders):
    overrides = clip_overrides(name, clip_folders["full"], pretrained=False)
    config = model_config(name, overrides)
    with parameters_on_meta():
        model = build_model(DATA / name, overrides=overrides)
    layout = checkpoint_layout(config, clip=CLIP_L)
    report = load_weights(model, meta_file(layout, config))
    assert report.ok, report.describe(name, type(model).__name__)
    notes = " | ".join(report.notes)
    losses = count(layout, "loss.")[0]
    assert (f"{losses} loss.* key(s) dropped" in notes) == (losses > 0)
    ema = count(layout, "model_ema.")[0]
    assert (f"{ema - 2} weights under model.* replaced by their EMA copies" in notes) == (ema > 0)
    logits = "2 key(s) of the file not used, by rule of TransformerEncoder (cond_stage_model.transformer.*)"
    assert (logits in notes) == ("BERTEmbedder" in str(config))


def test_rules_reproduce_the_published_sizes():
    """Cross-checks of the layout rules: SD 1.x key counts (REFERENCE.md §2) and the LDM paper's model sizes."""
    sd = checkpoint_layout(model_config(f"{SD}configs/stable-diffusion/v1-inference.yaml", []), clip=CLIP_L)
    assert len(sd) == 1143 and count(sd, "model.diffusion_model.") == (686, 859_520_964)
    assert count(sd, "first_stage_model.") == (248, 83_653_863) and count(sd, "cond_stage_model.")[0] == 197
    assert sum(1 for k in sd if "." not in k) == 12
    millions = {f"{LD}configs/latent-diffusion/celebahq-ldm-vq-4.yaml": 274,     # CelebA-HQ LDM-4
                f"{LD}configs/latent-diffusion/ffhq-ldm-vq-4.yaml": 274,
                f"{LD}configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml": 274,
                f"{LD}configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml": 294,  # LDM-8
                f"{LD}configs/latent-diffusion/cin256-v2.yaml": 400,               # ImageNet LDM-4
                f"{LD}models/ldm/inpainting_big/config.yaml": 387}                 # inpainting, big
    for name, size in millions.items():
        assert count(checkpoint_layout(model_config(name, [])), "model.diffusion_model.")[1] // 10 ** 6 == size, name
    txt2img = checkpoint_layout(model_config(f"{LD}configs/latent-diffusion/txt2img-1p4B-eval.yaml", []))
    unet, bert = count(txt2img, "model.diffusion_model."), count(txt2img, "cond_stage_model.")
    assert bert[0] == 13 * 32 + 6 and (unet[1] + bert[1]) // 10 ** 7 == 145   # LDM-KL-8-G: 1.45B


# ---- shrunk, random numbers, through ldm.load_model --------------------------------------------------------------
def random_file(layout: dict, config: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: make_tensor(k, s, meta=False, g=g) for k, s in layout.items()}
    if config["params"].get("cond_stage_config") == "__is_first_stage__":  # one module saved under both names
        sd |= {k: sd["first_stage_model." + k[len("cond_stage_model."):]] for k in sd
               if k.startswith("cond_stage_model.")}
    return sd | meta_file({}, config)                                      # a valid schedule, for sampling


def source_key(key: str, sd: dict, ema: bool) -> str | None:
    """The file key a model tensor was loaded from: its EMA copy, its own name, or CLIP's `text_model.` name."""
    if ema and key.startswith("model.diffusion_model."):
        return "model_ema." + key[len("model."):].replace(".", "")
    if key in sd:
        return key
    clip = key.replace("cond_stage_model.transformer.", "cond_stage_model.transformer.text_model.", 1)
    return clip if clip in sd else None


@pytest.mark.parametrize("index, name", list(enumerate(NAMES)))
def test_tiny_random_checkpoint_loads_through_load_model(index, name, clip_folders, tmp_path, caplog):
    overrides = list(CONFIGS[name]) + clip_overrides(name, clip_folders["tiny"], pretrained=True)
    config = model_config(name, overrides)
    sd = random_file(checkpoint_layout(config, clip=TINY_CLIP), config, seed=index)
    path = tmp_path / ("model.safetensors" if index % 2 else "model.ckpt")
    save_safetensors(sd, path) if index % 2 else save_checkpoint_atomic({"state_dict": sd, "global_step": 3}, path)
    with caplog.at_level(logging.INFO, logger="ldm"):
        model = load_model(DATA / name, path, overrides=overrides)
    ema = "model_ema.decay" in sd
    for key, value in model.state_dict().items():
        if key == "quantize.steps_unused" or key.endswith(".quantize.steps_unused"):
            continue                                                  # ours, not in published files
        source = source_key(key, sd, ema)
        assert source is not None and torch.equal(value, sd[source]), key
    if "data" in (DATA / name).read_text():
        assert "belongs to" not in caplog.text and "a data set of the original repositories" in caplog.text
    if "BERTEmbedder" in str(config):
        assert "the token-prediction head (to_logits)" in caplog.text
    sample_smoke(model, config)


def sample_smoke(model, config: dict) -> None:
    """The loaded model works for inference: a reconstruction, or two DDIM steps decoded to images."""
    g = torch.Generator().manual_seed(0)
    params = config["params"]
    if not config["target"].endswith("LatentDiffusion"):
        x = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        assert model(x)[0].shape == x.shape
        return
    levels = len(params["unet_config"]["params"].get("channel_mult", (1, 2, 4, 8)))
    side = max(8, 2 ** (levels - 1))
    factor = 2 ** (len(params["first_stage_config"]["params"]["ddconfig"]["ch_mult"]) - 1)
    images = model.sample(condition(model, params, side, g), batch_size=1, steps=2, generator=g,
                          x_T=torch.randn(1, params["channels"], side, side, generator=g))
    assert images.shape == (1, 3, side * factor, side * factor) and torch.isfinite(images).all()


def condition(model, params: dict, side: int, g: torch.Generator):
    """A raw condition of each published conditioner, through get_learned_conditioning."""
    cond = params.get("cond_stage_config")
    if cond == "__is_unconditional__":
        return None
    if cond == "__is_first_stage__":                                  # inpainting_big: [z(masked image), mask]
        z = model.get_learned_conditioning(torch.randn(1, 3, 4 * side, 4 * side, generator=g))
        return {"c_concat": torch.cat([z, torch.zeros(1, 1, side, side)], dim=1)}
    name, p = cond["target"].rsplit(".", 1)[-1], cond.get("params") or {}
    raw = {"ClassEmbedder": lambda: torch.tensor([3]),
           "BERTEmbedder": lambda: (["a photograph of a cat"] if p.get("use_tokenizer", True)
                                    else torch.randint(0, p.get("vocab_size", 30522), (1, p["max_seq_len"]))),
           "SpatialRescaler": lambda: torch.rand(1, p["in_channels"], 4 * side, 4 * side, generator=g),
           "FrozenCLIPEmbedder": lambda: ["a cat"],
           "Identity": lambda: (torch.randn(1, 3, side, side) if model.cond_stage_keyword == "c_concat" else
                                torch.randn(1, 4, params["unet_config"]["params"]["context_dim"]))}[name]()
    return model.get_learned_conditioning(raw)


# ---- scripts/sample.py on the published image-conditional configs ------------------------------------------------
@pytest.mark.parametrize("name", ["models/ldm/inpainting_big/config.yaml",
                                  "models/ldm/semantic_synthesis256/config.yaml"])
def test_sample_script_takes_the_published_inpainting_and_semantic_configs(name, tmp_path):
    """inpainting_big (first stage as conditioner, U-Net on [x_t, z(masked image), mask]) takes --image --mask;
    semantic_synthesis256 (SpatialRescaler on 182 one-hot classes) takes a label-map PNG."""
    name = LD + name
    config = model_config(name, list(CONFIGS[name]))
    save_safetensors(random_file(checkpoint_layout(config), config, seed=5), tmp_path / "model.safetensors")
    rng = np.random.default_rng(0)
    if "inpainting" in name:
        picture, mask = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), np.zeros((64, 64), np.uint8)
        mask[16:48, 20:44] = 255
        Image.fromarray(picture).save(tmp_path / "photo.png"), Image.fromarray(mask).save(tmp_path / "mask.png")
        flags = ["--image", tmp_path / "photo.png", "--mask", tmp_path / "mask.png"]
    else:
        Image.fromarray(rng.integers(0, 182, (64, 64), dtype=np.uint8)).save(tmp_path / "photo.png")
        flags = ["--image", tmp_path / "photo.png"]
    assert run_script("--config", DATA / name, "--ckpt", tmp_path / "model.safetensors", "--n", 1, "--steps", 2,
                      "--outdir", tmp_path / "out", *CONFIGS[name], *flags) == 0
    out = pixels(tmp_path / "out" / "00000_photo.png")
    assert out.shape == (64, 64, 3)
    if "inpainting" in name:
        known = mask == 0
        assert np.array_equal(out[known], picture[known]) and np.abs(out[~known] - picture[~known]).mean() > 10

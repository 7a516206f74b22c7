"""Whole checkpoints: our config + checkpoint -> a diffusers folder, a diffusers folder -> our checkpoint + config.

Ours -> diffusers: a first stage (AutoencoderKL / VQModel) becomes one model folder; a latent diffusion model a
pipeline folder: text-to-image (CLIP conditioner) a StableDiffusionPipeline (`unet/`, `vae/`, `text_encoder/`,
`tokenizer/` when available offline, `scheduler/`, `model_index.json`), an unconditional one an LDMPipeline
(`unet/`, `vqvae/`, `scheduler/`); a pixel-space DDPM a DDPMPipeline. Other conditioners have no diffusers
component: their U-Net, first stage and scheduler are written without a model_index.json (said in the notes).
Diffusers -> ours reads those same folders and writes the weights plus a YAML config naming our classes.
"""
import os
from typing import Any, Mapping

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import read_state_dict, save_checkpoint_atomic, save_safetensors, save_text_atomic
from ldm.compat import native_config
from ldm.convert import text_encoder as text
from ldm.convert.components import (FIRST_STAGE_TARGETS, KL_TARGET, VQ_INTERFACE, first_stage_from_component,
                                    first_stage_meta, first_stage_to_component, unet_from_component, unet_meta,
                                    unet_to_component)
from ldm.convert.folders import (DIFFUSERS_VERSION, TRANSFORMERS_WEIGHTS, cast, read_component, read_json,
                                 write_component, write_json)
from ldm.convert.keymap import ConversionError, StateDict, shapes, strip_prefix, with_prefix
from ldm.convert.scheduler import from_diffusers_scheduler, to_diffusers_scheduler
from ldm.convert.unet_config import UNET_TARGET
from ldm.diffusion.schedules import BUFFER_NAMES, schedule_buffers
from ldm.loading import drop_unused_losses, model_section, select_ema

LDM_TARGET, DDPM_TARGET = "ldm.models.latent_diffusion.LatentDiffusion", "ldm.models.ddpm.DDPM"
TEXT_TARGET = "ldm.modules.encoders.text.FrozenTextEmbedder"
UNET, FIRST, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
UNCONDITIONAL = "__is_unconditional__"
SD, LDM, DDPM = "StableDiffusionPipeline", "LDMPipeline", "DDPMPipeline"
SCHEDULERS = {SD: "PNDMScheduler", LDM: "DDIMScheduler", DDPM: "DDPMScheduler", None: "DDIMScheduler"}


# ---- ours -> diffusers -------------------------------------------------------------------------------------------
def read_ours(ckpt: str, expected: Mapping[str, tuple], use_ema: bool, allow_pickle: bool) -> tuple[StateDict, list]:
    """A checkpoint's weights, safely read, with the EMA copies chosen (or dropped) and training losses dropped."""
    notes: list[str] = []
    sd = read_state_dict(ckpt, allow_pickle=allow_pickle)
    sd = select_ema(sd, expected, use_ema, notes)
    return drop_unused_losses(sd, expected, notes), notes


def ldm_to_diffusers(config: Any, ckpt: str, out: str, *, use_ema: bool = True, allow_pickle: bool = False,
                     clip: str | None = None, dtype: str | None = None, scaling_factor: float | None = None) -> list:
    """Convert our checkpoint (with its config: ours or the original CompVis/SD YAML) into a diffusers folder
    `out`; returns notes for the user."""
    section = native_config(model_section(config))
    target, params, ckpt = section["target"], section.get("params") or {}, os.fspath(ckpt)
    if target in FIRST_STAGE_TARGETS:
        sd, notes = read_ours(ckpt, shapes(first_stage_meta(target, params)), use_ema, allow_pickle)
        default = 0.18215 if target == KL_TARGET else 1.0
        comp = first_stage_to_component(target, params, sd, scaling_factor or default, ckpt)
        write_component(out, comp.config, cast(comp.state_dict, dtype))
        return notes + [f"wrote a diffusers {comp.config['_class_name']} to {out}"]
    if target in (LDM_TARGET, DDPM_TARGET):
        return _pipeline_to_diffusers(target, params, ckpt, out, use_ema, allow_pickle, clip, dtype)
    raise ConversionError(f"model.target {target!r} has no diffusers counterpart; supported: "
                          f"{', '.join((LDM_TARGET, DDPM_TARGET) + FIRST_STAGE_TARGETS)}")


def _conditioner(params: Mapping[str, Any]) -> str | None:
    """'clip' (text-to-image), None (unconditional) or 'other'."""
    cond = params.get("cond_stage_config")
    if cond in (None, UNCONDITIONAL):
        return None
    if isinstance(cond, Mapping) and cond.get("target") == TEXT_TARGET \
            and (cond.get("params") or {}).get("model_class") == "clip":
        return "clip"
    return "other"


def _pipeline_to_diffusers(target, params, ckpt, out, use_ema, allow_pickle, clip, dtype) -> list[str]:
    unet_params, ldm = params["unet_config"].get("params") or {}, target == LDM_TARGET
    expected = with_prefix(shapes(unet_meta(unet_params)), UNET)
    if ldm:
        fs = params["first_stage_config"]
        expected.update(with_prefix(shapes(first_stage_meta(fs["target"], fs.get("params") or {})), FIRST))
    sd, notes = read_ours(ckpt, expected, use_ema, allow_pickle)
    kind = _conditioner(params) if ldm else None
    pipeline = (SD if kind == "clip" else LDM if kind is None else None) if ldm else DDPM
    _check_leftovers(sd, ckpt, kind, notes)
    unet = unet_to_component(unet_params, strip_prefix(sd, UNET), ckpt, UNET)
    write_component(os.path.join(out, "unet"), unet.config, cast(unet.state_dict, dtype))
    index = {"unet": ["diffusers", unet.config["_class_name"]]}
    if ldm:
        scaling = float(sd["scale_factor"]) if "scale_factor" in sd else float(params.get("scale_factor", 1.0))
        vae = first_stage_to_component(fs["target"], fs.get("params") or {}, strip_prefix(sd, FIRST), scaling,
                                       ckpt, FIRST)
        name = "vae" if pipeline == SD else "vqvae"
        write_component(os.path.join(out, name), vae.config, cast(vae.state_dict, dtype))
        index[name] = ["diffusers", vae.config["_class_name"]]
    scheduler = to_diffusers_scheduler(params, SCHEDULERS[pipeline])
    write_json({**scheduler, "_diffusers_version": DIFFUSERS_VERSION},
               os.path.join(out, "scheduler", "scheduler_config.json"))
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    if kind == "clip":
        index.update(_text_to_diffusers(params["cond_stage_config"].get("params") or {}, sd, ckpt, out, clip,
                                        dtype, notes))
    if pipeline is None:
        notes.append(f"no model_index.json: diffusers has no pipeline for the conditioner "
                     f"{params['cond_stage_config'].get('target')}; unet/, vae/ and scheduler/ are usable alone")
        return notes + [f"wrote diffusers components to {out}"]
    write_json(_model_index(pipeline, index), os.path.join(out, "model_index.json"))
    return notes + [f"wrote a diffusers {pipeline} folder to {out}"]


def _check_leftovers(sd: Mapping, ckpt: str, kind: str | None, notes: list[str]) -> None:
    """Keys outside the U-Net, first stage and text encoder: schedule buffers are dropped (the scheduler config
    carries the schedule); a non-CLIP conditioner is left out with a note; anything else is an error."""
    known = (UNET, FIRST, TEXT) if kind == "clip" else (UNET, FIRST)
    rest = [k for k in sd if not k.startswith(known) and k not in BUFFER_NAMES and k != "scale_factor"]
    cond = [k for k in rest if k.startswith("cond_stage_model.") and kind == "other"]
    if cond:
        notes.append(f"{len(cond)} cond_stage_model.* key(s) not converted: diffusers has no component for "
                     f"this conditioner")
    unknown = [k for k in rest if k not in cond]
    if unknown:
        raise ConversionError(f"{ckpt}: unknown key(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}: not part "
                              f"of the U-Net, first stage or text encoder of this config")


def _text_to_diffusers(cond: Mapping[str, Any], sd: Mapping, ckpt: str, out: str, clip: str | None,
                       dtype: str | None, notes: list[str]) -> dict[str, list]:
    weights = strip_prefix(sd, TEXT)
    config = text.clip_config(cond.get("version") or text.CLIP_L, weights, clip, f"{ckpt} ({TEXT}*)")
    text.check_text_encoder(weights, config, ckpt, TEXT)
    folder = os.path.join(out, "text_encoder")
    write_component(folder, config, cast(text.published_naming(weights), dtype), name=TRANSFORMERS_WEIGHTS)
    text.save_text_config(config, folder)
    if cond.get("layer", "last") != "last":
        notes.append(f"the conditioner uses the {cond['layer']} CLIP layer: pass clip_skip=1 to the diffusers "
                     f"pipeline call to match")
    problem = text.copy_tokenizer(clip or cond.get("tokenizer") or cond.get("version") or text.CLIP_L,
                                  os.path.join(out, "tokenizer"))
    if problem:
        notes.append(f"tokenizer/ not written: {problem}; copy it from {text.CLIP_L} (its tokenizer files)")
        return {"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": [None, None]}
    return {"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}


def _model_index(pipeline: str, components: Mapping[str, list]) -> dict[str, Any]:
    index: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION}
    if pipeline == SD:
        index.update(feature_extractor=[None, None], safety_checker=[None, None], image_encoder=[None, None],
                     requires_safety_checker=False)
    return {**index, **components}


# ---- diffusers -> ours -------------------------------------------------------------------------------------------
def diffusers_to_ldm(folder: str, out: str, *, out_config: str | None = None, dtype: str | None = None,
                     allow_pickle: bool = False) -> list[str]:
    """Convert a diffusers pipeline folder (StableDiffusion / LDM / DDPM) or one AutoencoderKL / VQModel folder
    into our checkpoint `out` (.safetensors, or .ckpt/.pt: a dict with `state_dict`) and its config YAML."""
    folder = os.fspath(folder)
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        section, sd = _pipeline_to_ours(folder, read_json(os.path.join(folder, "model_index.json")), allow_pickle)
    elif os.path.isfile(os.path.join(folder, "config.json")):
        config, weights, path = read_component(folder, allow_pickle=allow_pickle)
        target, params, sd, _ = first_stage_from_component(config, weights, path)
        section = {"target": target, "params": params}
    else:
        raise ConversionError(f"{folder}: neither model_index.json (a pipeline) nor config.json (one model) found")
    write_ours(cast(sd, dtype), out)
    out_config = out_config or os.path.splitext(out)[0] + ".yaml"
    save_text_atomic(OmegaConf.to_yaml(OmegaConf.create({"model": section})), out_config)
    return [f"wrote {len(sd)} tensors to {out} and the config to {out_config}"]


def write_ours(sd: Mapping, out: str) -> None:
    """`.safetensors` (a bare state dict) or a torch file with {'state_dict': ...}, written atomically."""
    if out.endswith(".safetensors"):
        save_safetensors(sd, out, metadata={"format": "pt"})
    else:
        save_checkpoint_atomic({"state_dict": dict(sd)}, out)


def _pipeline_to_ours(folder: str, index: Mapping[str, Any], allow_pickle: bool) -> tuple[dict, StateDict]:
    pipeline = index.get("_class_name")
    if pipeline not in (SD, LDM, DDPM):
        raise ConversionError(f"{folder}/model_index.json: pipeline {pipeline!r} is not supported ({SD}, {LDM}, "
                              f"{DDPM})")
    config, weights, path = read_component(os.path.join(folder, "unet"), allow_pickle=allow_pickle)
    unet_params, unet_sd = unet_from_component(config, weights, path)
    scheduler_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    params = {**from_diffusers_scheduler(read_json(scheduler_path), scheduler_path),
              "image_size": unet_params["image_size"], "channels": unet_params["in_channels"],
              "unet_config": {"target": UNET_TARGET, "params": unet_params}}
    sd = with_prefix(unet_sd, UNET)
    target = DDPM_TARGET if pipeline == DDPM else LDM_TARGET
    if pipeline != DDPM:
        name = "vae" if pipeline == SD else "vqvae"
        config, weights, path = read_component(os.path.join(folder, name), allow_pickle=allow_pickle)
        fs_target, fs_params, fs_sd, scaling = first_stage_from_component(config, weights, path, VQ_INTERFACE)
        sd.update(with_prefix(fs_sd, FIRST))
        params.update(scale_factor=scaling, first_stage_key="image",
                      first_stage_config={"target": fs_target, "params": fs_params}, cond_stage_config=UNCONDITIONAL)
    if pipeline == SD:
        params.update(_text_to_ours(folder, sd, allow_pickle))
    schedule = {k: params[k] for k in ("timesteps", "linear_start", "linear_end", "beta_schedule") if k in params}
    betas = params.get("given_betas")
    sd.update(schedule_buffers(**schedule, given_betas=None if betas is None else torch.tensor(betas, dtype=torch.float64)))
    return {"target": target, "params": params}, sd


def _text_to_ours(folder: str, sd: StateDict, allow_pickle: bool) -> dict[str, Any]:
    """Add the text encoder's weights to `sd`; the LatentDiffusion params of the text conditioning."""
    text_folder = os.path.join(folder, "text_encoder")
    config, weights, path = read_component(text_folder, TRANSFORMERS_WEIGHTS, allow_pickle)
    text.check_text_encoder(weights, config, path)
    sd.update(with_prefix(text.published_naming(weights), TEXT))
    tokenizer = text.tokenizer_folder(os.path.join(folder, "tokenizer"))
    cond = {"version": os.path.abspath(text_folder), "tokenizer": os.path.abspath(tokenizer) if tokenizer
            else text.CLIP_L, "model_class": "clip", "pretrained": False, "max_length": 77}
    return {"conditioning_key": "crossattn", "cond_stage_key": "caption",
            "cond_stage_config": {"target": TEXT_TARGET, "params": cond}}


# ---- formats -----------------------------------------------------------------------------------------------------
def convert_format(ckpt: str, out: str, *, allow_pickle: bool = False, dtype: str | None = None) -> list[str]:
    """Our checkpoint as `.safetensors` or `.ckpt` (same keys; only the weights are kept)."""
    sd = read_state_dict(ckpt, allow_pickle=allow_pickle)
    write_ours(cast(sd, dtype), out)
    return [f"wrote {len(sd)} tensors to {out}"]

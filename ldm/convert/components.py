"""One network at a time: our params + state dict <-> a diffusers component (config + state dict), checked.

Before mapping, the source weights are checked against the model their config describes (built on the meta
device: keys and shapes only), so a missing key, an unknown key or a shape mismatch is reported in the source
file's own key names, with both shapes.
"""
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ldm.convert.keymap import ConversionError, StateDict, check_shapes, meta_state_dict, shapes, to_theirs
from ldm.convert.unet import unet_from_diffusers, unet_pairs, unet_to_diffusers
from ldm.convert.unet_config import UNET_TARGET, from_diffusers_unet, to_diffusers_unet
from ldm.convert.vae import (KL_CLASS, autoencoder_from_diffusers, autoencoder_pairs, autoencoder_to_diffusers,
                             from_diffusers_kl, to_diffusers_kl)
from ldm.convert.vq import QUANTIZE, VQ_CLASS, from_diffusers_vq, to_diffusers_vq, vq_from_diffusers, vq_to_diffusers
from ldm.util import get_obj_from_str, instantiate_from_config

KL_TARGET = "ldm.models.autoencoder.AutoencoderKL"
VQ_TARGET, VQ_INTERFACE = "ldm.models.autoencoder.VQModel", "ldm.models.autoencoder.VQModelInterface"
FIRST_STAGE_TARGETS = (KL_TARGET, VQ_TARGET, VQ_INTERFACE)


@dataclass
class Component:
    """A diffusers model: its config.json (with `_class_name`) and state dict."""

    config: dict[str, Any]
    state_dict: StateDict


# ---- U-Net -------------------------------------------------------------------------------------------------------
def unet_meta(params: Mapping[str, Any]) -> StateDict:
    return meta_state_dict(lambda: get_obj_from_str(UNET_TARGET)(**params))


def unet_to_component(params: Mapping[str, Any], sd: Mapping[str, torch.Tensor], source: str,
                      prefix: str = "") -> Component:
    """Our U-Net weights (keys without `prefix`, e.g. `model.diffusion_model.`) -> UNet2DConditionModel /
    UNet2DModel."""
    _, config = to_diffusers_unet(params, source)
    check_shapes(shapes(unet_meta(params)), sd, source, "UNetModel", prefix)
    return Component(config, unet_to_diffusers(sd, params, source))


def unet_from_component(config: Mapping[str, Any], sd: Mapping[str, torch.Tensor],
                        source: str) -> tuple[dict[str, Any], StateDict]:
    """(our UNetModel params, our weights) of a diffusers U-Net."""
    params = from_diffusers_unet(config, source)
    expected = to_theirs(unet_meta(params), unet_pairs(params), "UNetModel")
    check_shapes(shapes(expected), sd, source, config["_class_name"])
    return params, unet_from_diffusers(sd, params, source)


# ---- first stage -------------------------------------------------------------------------------------------------
def first_stage_meta(target: str, params: Mapping[str, Any]) -> StateDict:
    from ldm.loading import inference_config

    cfg, _ = inference_config({"target": target, "params": dict(params)})
    return meta_state_dict(lambda: instantiate_from_config(cfg, where="first stage"))


def first_stage_to_component(target: str, params: Mapping[str, Any], sd: Mapping[str, torch.Tensor],
                             scaling_factor: float, source: str, prefix: str = "") -> Component:
    """Our AutoencoderKL / VQModel weights -> diffusers AutoencoderKL / VQModel."""
    if target not in FIRST_STAGE_TARGETS:
        raise ConversionError(f"{source}: first stage {target!r} has no diffusers counterpart "
                              f"(supported: {', '.join(FIRST_STAGE_TARGETS)})")
    dd = params["ddconfig"]
    if target == KL_TARGET:
        config, convert = to_diffusers_kl(params, scaling_factor, source), autoencoder_to_diffusers
    else:
        config, convert = to_diffusers_vq(params, scaling_factor, source), vq_to_diffusers
    check_shapes(shapes(first_stage_meta(target, params)), sd, source, target.rsplit(".", 1)[-1], prefix)
    return Component(config, convert(sd, dd, source=source))


def first_stage_from_component(config: Mapping[str, Any], sd: Mapping[str, torch.Tensor], source: str,
                               vq_target: str = VQ_TARGET) -> tuple[str, dict[str, Any], StateDict, float]:
    """(our target, params, weights, scaling_factor) of a diffusers AutoencoderKL / VQModel."""
    name = config.get("_class_name")
    if name == KL_CLASS:
        target, (params, scaling), extra = KL_TARGET, from_diffusers_kl(config, source), []
    elif name == VQ_CLASS:
        target, (params, scaling), extra = vq_target, from_diffusers_vq(config, source), QUANTIZE
    else:
        raise ConversionError(f"{source}: _class_name {name!r}; supported first stages are {KL_CLASS}, {VQ_CLASS}")
    expected = to_theirs(first_stage_meta(target, params), autoencoder_pairs(params["ddconfig"]) + extra, target)
    check_shapes(shapes(expected), sd, source, name)
    convert = vq_from_diffusers if name == VQ_CLASS else autoencoder_from_diffusers
    return target, params, convert(sd, params["ddconfig"], source=source), scaling

"""Our VQModel (encoder/decoder as in ldm/convert/vae.py, plus `quantize.embedding`) <-> diffusers' VQModel.

Our quantizer's `quantize.steps_unused` buffer (dead-code restart bookkeeping) has no counterpart: it is dropped
towards diffusers and written as zeros (a fresh counter) towards ours.
"""
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ldm.convert.keymap import ConversionError, Kind, ModulePair, StateDict
from ldm.convert.vae import (autoencoder_from_diffusers, autoencoder_to_diffusers, check_ddconfig,
                             ddconfig_from_diffusers, diffusers_blocks)

VQ_CLASS = "VQModel"


@dataclass(frozen=True)
class Quantizer(Kind):
    """`embedding.weight` on both sides; our `steps_unused` buffer is dropped / zero-filled."""

    def to_theirs(self, sub: StateDict) -> StateDict:
        unknown = [k for k in sub if k not in ("embedding.weight", "steps_unused")]
        if unknown:
            raise KeyError(unknown[0])
        return {"embedding.weight": sub["embedding.weight"]}

    def to_ours(self, sub: StateDict) -> StateDict:
        unknown = [k for k in sub if k != "embedding.weight"]
        if unknown:
            raise KeyError(unknown[0])
        steps = torch.zeros(sub["embedding.weight"].shape[0], dtype=torch.long)  # a fresh restart counter
        return {**sub, "steps_unused": steps}


QUANTIZE = [ModulePair("quantize", "quantize", Quantizer())]


def vq_to_diffusers(sd: Mapping[str, torch.Tensor], dd: Mapping[str, Any], source: str = "first stage") -> StateDict:
    return autoencoder_to_diffusers(sd, dd, QUANTIZE, source)


def vq_from_diffusers(sd: Mapping[str, torch.Tensor], dd: Mapping[str, Any], source: str = "vqvae") -> StateDict:
    return autoencoder_from_diffusers(sd, dd, QUANTIZE, source)


def to_diffusers_vq(params: Mapping[str, Any], scaling_factor: float = 1.0,
                    source: str = "first_stage_config") -> dict[str, Any]:
    """diffusers VQModel config of our VQModel params (ddconfig, n_embed, embed_dim)."""
    dd = check_ddconfig({**params["ddconfig"], "double_z": params["ddconfig"].get("double_z", False)}, source)
    if params.get("remap") is not None:
        raise ConversionError(f"{source}: remap has no diffusers counterpart")
    return {"_class_name": VQ_CLASS, **diffusers_blocks(dd), "latent_channels": dd["z_channels"],
            "num_vq_embeddings": params["n_embed"], "vq_embed_dim": params["embed_dim"],
            "scaling_factor": scaling_factor, "norm_type": "group", "lookup_from_codebook": False,
            "force_upcast": False}


def from_diffusers_vq(config: Mapping[str, Any], source: str = "vqvae/config.json") -> tuple[dict, float]:
    """(our VQModel params, scaling_factor) of a diffusers VQModel config."""
    if config.get("_class_name") != VQ_CLASS:
        raise ConversionError(f"{source}: _class_name {config.get('_class_name')!r}, expected {VQ_CLASS}")
    latent = config.get("latent_channels", 3)
    params = {"embed_dim": config.get("vq_embed_dim") or latent, "n_embed": config["num_vq_embeddings"],
              "ddconfig": ddconfig_from_diffusers(config, latent, False, source),
              "lossconfig": {"target": "torch.nn.Identity"}}
    return params, float(config.get("scaling_factor", 1.0))

"""Our first-stage autoencoder (CompVis keys: `encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`) <->
diffusers' AutoencoderKL; the Encoder / Decoder correspondence is shared with VQModel (ldm/convert/vq.py).

Encoder level L = encoder.down_blocks.L (`block.B` = resnets.B, `attn.B` = attentions.B, `downsample.conv` =
downsamplers.0.conv); decoder level L = decoder.up_blocks.(levels-1-L) (`upsample.conv` = upsamplers.0.conv);
`mid.{block_1, attn_1, block_2}` = mid_block.{resnets.0, attentions.0, resnets.1}; `norm_out` = conv_norm_out.
The attention's q, k, v, proj_out are 1x1 convs here and Linear layers there (weights reshaped).
"""
from typing import Any, Mapping

import torch

from ldm.convert.keymap import ConversionError, ConvAsLinear, ModulePair, Renamed, StateDict, to_ours, to_theirs

KL_CLASS = "AutoencoderKL"
RESNET = Renamed({"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                  "nin_shortcut": "conv_shortcut"})
ATTENTION = ConvAsLinear({"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"},
                         convs=("q", "k", "v", "proj_out"), conv_dims=2)
# attention names of diffusers files saved before diffusers 0.14
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_DDCONFIG_DEFAULTS = {"dropout": 0.0, "resamp_with_conv": True, "attn_type": "vanilla", "use_linear_attn": False,
                      "give_pre_end": False, "tanh_out": False, "norm_type": "group", "double_z": True}


def level_has_attention(dd: Mapping[str, Any], level: int) -> bool:
    return dd["resolution"] // 2 ** level in list(dd["attn_resolutions"])


def _mid_pairs(net: str) -> list[ModulePair]:
    return [ModulePair(f"{net}.mid.block_1", f"{net}.mid_block.resnets.0", RESNET),
            ModulePair(f"{net}.mid.attn_1", f"{net}.mid_block.attentions.0", ATTENTION),
            ModulePair(f"{net}.mid.block_2", f"{net}.mid_block.resnets.1", RESNET)]


def autoencoder_pairs(dd: Mapping[str, Any]) -> list[ModulePair]:
    """Module correspondence of the Encoder/Decoder of `ddconfig` and the quant convs."""
    levels, nrb = len(dd["ch_mult"]), dd["num_res_blocks"]
    pairs = [ModulePair(p, p) for p in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                                        "quant_conv", "post_quant_conv")]
    pairs += [ModulePair(f"{net}.norm_out", f"{net}.conv_norm_out") for net in ("encoder", "decoder")]
    pairs += _mid_pairs("encoder") + _mid_pairs("decoder")
    for level in range(levels):
        down, up = f"encoder.down_blocks.{level}", f"decoder.up_blocks.{levels - 1 - level}"
        for b in range(nrb + 1):
            if b < nrb:
                pairs.append(ModulePair(f"encoder.down.{level}.block.{b}", f"{down}.resnets.{b}", RESNET))
            pairs.append(ModulePair(f"decoder.up.{level}.block.{b}", f"{up}.resnets.{b}", RESNET))
            if level_has_attention(dd, level):
                if b < nrb:
                    pairs.append(ModulePair(f"encoder.down.{level}.attn.{b}", f"{down}.attentions.{b}", ATTENTION))
                pairs.append(ModulePair(f"decoder.up.{level}.attn.{b}", f"{up}.attentions.{b}", ATTENTION))
        if level != levels - 1:
            pairs.append(ModulePair(f"encoder.down.{level}.downsample.conv", f"{down}.downsamplers.0.conv"))
        if level != 0:
            pairs.append(ModulePair(f"decoder.up.{level}.upsample.conv", f"{up}.upsamplers.0.conv"))
    return pairs


def autoencoder_to_diffusers(sd: Mapping[str, torch.Tensor], dd: Mapping[str, Any], extra: list[ModulePair] = (),
                             source: str = "first stage") -> StateDict:
    return to_theirs(sd, autoencoder_pairs(dd) + list(extra), source)


def autoencoder_from_diffusers(sd: Mapping[str, torch.Tensor], dd: Mapping[str, Any], extra: list[ModulePair] = (),
                               source: str = "vae") -> StateDict:
    renamed = {}
    for key, value in sd.items():
        parts = key.split(".")
        if len(parts) > 2 and "attentions" in parts and parts[-2] in _OLD_ATTENTION:
            key = ".".join(parts[:-2] + [_OLD_ATTENTION[parts[-2]], parts[-1]])
            value = value.reshape(value.shape[:2]) if value.ndim == 4 else value
        renamed[key] = value
    return to_ours(renamed, autoencoder_pairs(dd) + list(extra), source)


# ---- configs -----------------------------------------------------------------------------------------------------
def check_ddconfig(dd: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The ddconfig with defaults; settings diffusers cannot express are a ConversionError."""
    dd = {**_DDCONFIG_DEFAULTS, **dd}
    bad = {k: dd[k] for k in ("resamp_with_conv", "give_pre_end", "tanh_out", "use_linear_attn")
           if dd[k] != (k == "resamp_with_conv")}
    if dd["norm_type"] != "group":
        bad["norm_type"] = dd["norm_type"]
    if dd["attn_type"] not in ("vanilla", "vanilla-xformers", "none"):
        bad["attn_type"] = dd["attn_type"]
    if dd["attn_type"] == "none" and list(dd["attn_resolutions"]):
        bad["attn_resolutions"] = list(dd["attn_resolutions"])
    if bad:
        raise ConversionError(f"{source}: ddconfig setting(s) {bad} have no diffusers counterpart")
    return dd


def diffusers_blocks(dd: Mapping[str, Any]) -> dict[str, Any]:
    """Encoder/Decoder fields shared by diffusers' AutoencoderKL and VQModel configs."""
    levels = len(dd["ch_mult"])
    attn = [level_has_attention(dd, level) for level in range(levels)]
    return {"in_channels": dd["in_channels"], "out_channels": dd["out_ch"],
            "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
            "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
            "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]], "layers_per_block": dd["num_res_blocks"],
            "act_fn": "silu", "norm_num_groups": 32, "sample_size": dd["resolution"],
            "mid_block_add_attention": dd["attn_type"] != "none"}


def to_diffusers_kl(params: Mapping[str, Any], scaling_factor: float, source: str = "first_stage_config") -> dict:
    """diffusers AutoencoderKL config of our AutoencoderKL params (ddconfig, embed_dim)."""
    dd = check_ddconfig(params["ddconfig"], source)
    if dd["z_channels"] != params["embed_dim"]:
        raise ConversionError(f"{source}: z_channels={dd['z_channels']} differs from embed_dim={params['embed_dim']}; "
                              f"diffusers' AutoencoderKL has one latent_channels for both")
    return {"_class_name": KL_CLASS, **diffusers_blocks(dd), "latent_channels": params["embed_dim"],
            "scaling_factor": scaling_factor, "force_upcast": True, "use_quant_conv": True,
            "use_post_quant_conv": True}


def ddconfig_from_diffusers(config: Mapping[str, Any], z_channels: int, double_z: bool, source: str) -> dict:
    """Our ddconfig of a diffusers AutoencoderKL / VQModel config."""
    bad = {k: config[k] for k, v in {"act_fn": "silu", "norm_num_groups": 32, "use_quant_conv": True,
                                     "use_post_quant_conv": True, "norm_type": "group"}.items()
           if k in config and config[k] != v}
    channels = list(config["block_out_channels"])
    down = list(config["down_block_types"])
    known = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
    if any(t not in known for t in down):
        bad["down_block_types"] = down
    elif list(config["up_block_types"]) != [t.replace("DownEncoder", "UpDecoder") for t in reversed(down)]:
        bad["up_block_types"] = list(config["up_block_types"])
    if any(c % channels[0] for c in channels):
        bad["block_out_channels"] = channels
    if bad:
        raise ConversionError(f"{source}: diffusers setting(s) {bad} have no counterpart in ldm's autoencoder")
    resolution = config.get("sample_size") or 256
    resolution = resolution[0] if isinstance(resolution, (list, tuple)) else resolution
    return {"double_z": double_z, "z_channels": z_channels, "resolution": resolution,
            "in_channels": config["in_channels"], "out_ch": config["out_channels"], "ch": channels[0],
            "ch_mult": [c // channels[0] for c in channels], "num_res_blocks": config["layers_per_block"],
            "attn_resolutions": [resolution // 2 ** i for i, t in enumerate(down) if known[t]], "dropout": 0.0,
            "attn_type": "vanilla" if config.get("mid_block_add_attention", True) else "none"}


def from_diffusers_kl(config: Mapping[str, Any], source: str = "vae/config.json") -> tuple[dict, float]:
    """(our AutoencoderKL params, scaling_factor) of a diffusers AutoencoderKL config."""
    if config.get("_class_name") != KL_CLASS:
        raise ConversionError(f"{source}: _class_name {config.get('_class_name')!r}, expected {KL_CLASS}")
    latent = config.get("latent_channels", 4)
    params = {"embed_dim": latent, "ddconfig": ddconfig_from_diffusers(config, latent, True, source),
              "lossconfig": {"target": "torch.nn.Identity"}}
    return params, float(config.get("scaling_factor", 0.18215))

"""Our UNetModel params <-> the config of diffusers' UNet2DConditionModel (cross-attention) or UNet2DModel.

A level of ours is a down block / mirrored up block there; attention at downsampling factor 2^L
(`attention_resolutions`) is a CrossAttn*/Attn* block type. Settings with no counterpart are a ConversionError
naming them.
"""
import inspect
from typing import Any, Mapping

from ldm.convert.keymap import ConversionError
from ldm.modules.diffusionmodules.unet import UNetModel

COND, PLAIN = "UNet2DConditionModel", "UNet2DModel"
UNET_TARGET = "ldm.modules.diffusionmodules.unet.UNetModel"

# diffusers settings our U-Net has fixed (missing keys take diffusers' defaults, which are these)
_FIXED = {"flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_eps": 1e-5,
          "downsample_padding": 1, "mid_block_scale_factor": 1, "center_input_sample": False,
          "time_embedding_type": "positional", "class_embed_type": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
          "addition_embed_type": None, "encoder_hid_dim": None, "time_cond_proj_dim": None,
          "timestep_post_act": None, "dual_cross_attention": False, "class_embeddings_concat": False,
          "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "attention_type": "default",
          "cross_attention_norm": None, "mid_block_only_cross_attention": None, "reverse_transformer_layers_per_block":
          None, "downsample_type": "conv", "upsample_type": "conv", "add_attention": True, "num_train_timesteps": None}


def unet_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Our UNetModel params with every default filled in and num_res_blocks as one int per level."""
    defaults = {n: p.default for n, p in inspect.signature(UNetModel).parameters.items()
                if p.default is not inspect.Parameter.empty}
    p = {**defaults, **params}
    levels = len(p["channel_mult"])
    nrb = p["num_res_blocks"]
    p["num_res_blocks"] = [nrb] * levels if isinstance(nrb, int) else list(nrb)
    p["channel_mult"], p["attention_resolutions"] = list(p["channel_mult"]), list(p["attention_resolutions"])
    return p


def level_has_attention(p: Mapping[str, Any], level: int) -> bool:
    return 2 ** level in p["attention_resolutions"]


def level_heads(p: Mapping[str, Any], channels: int, up: bool = False) -> int:
    """Attention heads at `channels` channels (as UNetModel builds them)."""
    if p["num_head_channels"] != -1:
        return channels // p["num_head_channels"]
    return p["num_heads_upsample"] if up and p["num_heads_upsample"] != -1 else p["num_heads"]


def _unsupported(p: Mapping[str, Any], source: str) -> None:
    checks = {"dims": p["dims"] == 2, "conv_resample": p["conv_resample"], "resblock_updown": not p["resblock_updown"],
              "num_attention_blocks": p["num_attention_blocks"] is None,
              "disable_self_attentions": not any(p["disable_self_attentions"] or []),
              "disable_middle_self_attn": not p["disable_middle_self_attn"],
              "num_classes": p["num_classes"] is None or isinstance(p["num_classes"], int),
              "attention_resolutions": all(r in [2 ** i for i in range(len(p["channel_mult"]))]
                                           for r in p["attention_resolutions"])}
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ConversionError(f"{source}: UNetModel setting(s) {', '.join(f'{n}={p[n]!r}' for n in bad)} have no "
                              f"diffusers UNet2DConditionModel / UNet2DModel counterpart")


def _heads_config(p: Mapping[str, Any], channels: list[int], source: str):
    """diffusers' attention_head_dim: heads per level (UNet2DConditionModel), channels per head (UNet2DModel)."""
    attn = [c for level, c in enumerate(channels) if level_has_attention(p, level)] + [channels[-1]]
    if p["use_spatial_transformer"]:
        if p["num_head_channels"] == -1:
            return p["num_heads"]
        if any(c % p["num_head_channels"] for c in attn):
            raise ConversionError(f"{source}: num_head_channels={p['num_head_channels']} does not divide the "
                                  f"attention channels {attn}")
        return [c // p["num_head_channels"] for c in channels]
    if p["num_head_channels"] != -1:
        return p["num_head_channels"]
    dims = {c // level_heads(p, c, up) for c in attn for up in (False, True)}
    if len(dims) != 1:
        raise ConversionError(f"{source}: num_heads={p['num_heads']} gives head widths {sorted(dims)}; diffusers' "
                              f"UNet2DModel needs one width (use num_head_channels)")
    return dims.pop()


def to_diffusers_unet(params: Mapping[str, Any], source: str = "unet_config") -> tuple[str, dict[str, Any]]:
    """(class name, diffusers config) of our UNetModel params: UNet2DConditionModel with cross-attention
    (use_spatial_transformer), else UNet2DModel."""
    p = unet_params(params)
    _unsupported(p, source)
    levels, mc = len(p["channel_mult"]), p["model_channels"]
    channels = [mc * m for m in p["channel_mult"]]
    nrb = p["num_res_blocks"]
    cond = bool(p["use_spatial_transformer"])
    if cond and p["context_dim"] is None:
        raise ConversionError(f"{source}: a spatial transformer without context_dim has no diffusers counterpart")
    down, up = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if cond else ("AttnDownBlock2D", "AttnUpBlock2D")
    attn = [level_has_attention(p, level) for level in range(levels)]
    config = {"_class_name": COND if cond else PLAIN, "sample_size": p["image_size"],
              "in_channels": p["in_channels"], "out_channels": p["out_channels"], "block_out_channels": channels,
              "layers_per_block": nrb[0] if len(set(nrb)) == 1 else nrb,
              "down_block_types": [down if a else "DownBlock2D" for a in attn],
              "up_block_types": [up if a else "UpBlock2D" for a in reversed(attn)],
              "attention_head_dim": _heads_config(p, channels, source), "dropout": p["dropout"],
              "resnet_time_scale_shift": "scale_shift" if p["use_scale_shift_norm"] else "default",
              "num_class_embeds": p["num_classes"], "flip_sin_to_cos": True, "freq_shift": 0,
              "norm_num_groups": p["norm_num_groups"], "norm_eps": 1e-5, "act_fn": "silu", "downsample_padding": 1}
    if cond:
        config.update(mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=p["context_dim"],
                      transformer_layers_per_block=p["transformer_depth"],
                      use_linear_projection=bool(p["use_linear_in_transformer"]), only_cross_attention=False,
                      upcast_attention=False)
    else:
        config.update(add_attention=True, attn_norm_num_groups=p["norm_num_groups"])
    return config["_class_name"], config


def _check_fixed(config: Mapping[str, Any], source: str) -> None:
    bad = {k: config[k] for k, v in _FIXED.items() if k in config and config[k] != v}
    if config.get("_class_name") == PLAIN and config.get("resnet_time_scale_shift") == "scale_shift" \
            and config.get("attn_norm_num_groups") is None:
        bad["attn_norm_num_groups"] = None  # the middle attention then has no group norm: not our layout
    groups = config.get("norm_num_groups", 32)
    if config.get("attn_norm_num_groups") not in (None, groups):
        bad["attn_norm_num_groups"] = config["attn_norm_num_groups"]  # ours: one group count everywhere
    if bad:
        raise ConversionError(f"{source}: diffusers setting(s) {bad} have no counterpart in ldm's UNetModel "
                              f"(supported: {', '.join(f'{k}={_FIXED[k]!r}' for k in bad if k in _FIXED)})")


def _block_levels(config: Mapping[str, Any], source: str) -> list[bool]:
    """Which levels have attention, from down_block_types (up_block_types must mirror them)."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    known = {"DownBlock2D": False, "CrossAttnDownBlock2D": True, "AttnDownBlock2D": True}
    if any(t not in known for t in down):
        raise ConversionError(f"{source}: down_block_types {down}: supported are {sorted(known)}")
    attn = [known[t] for t in down]
    expected = [t.replace("Down", "Up") for t in reversed(down)]
    if up != expected:
        raise ConversionError(f"{source}: up_block_types {up} must mirror down_block_types (expected {expected})")
    return attn


def _heads_params(config: Mapping[str, Any], channels: list[int], attn: list[bool], source: str) -> dict:
    cond = config["_class_name"] == COND
    heads = config.get("num_attention_heads") or config.get("attention_head_dim") if cond \
        else config.get("attention_head_dim")
    if heads is None:
        return {"num_heads": 1}
    if not cond:
        return {"num_head_channels": heads}
    if isinstance(heads, int):
        return {"num_heads": heads}
    used = [i for i, a in enumerate(attn) if a] + [len(channels) - 1]
    widths = {channels[i] // heads[i] for i in used}
    if len(widths) != 1 or any(channels[i] % heads[i] for i in used):
        raise ConversionError(f"{source}: attention_head_dim {list(heads)} gives unequal head widths; ldm's "
                              f"UNetModel needs one num_heads or one num_head_channels")
    return {"num_head_channels": widths.pop()}


def from_diffusers_unet(config: Mapping[str, Any], source: str = "unet/config.json") -> dict[str, Any]:
    """Our UNetModel params of a diffusers UNet2DConditionModel / UNet2DModel config."""
    name = config.get("_class_name")
    if name not in (COND, PLAIN):
        raise ConversionError(f"{source}: _class_name {name!r}; supported U-Nets are {COND} and {PLAIN}")
    _check_fixed(config, source)
    channels = list(config["block_out_channels"])
    mc = channels[0]
    if any(c % mc for c in channels):
        raise ConversionError(f"{source}: block_out_channels {channels} are not multiples of the first")
    attn = _block_levels(config, source)
    if name == COND and config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ConversionError(f"{source}: mid_block_type {config['mid_block_type']!r} is not supported")
    only_cross = config.get("only_cross_attention", False)
    if any(only_cross if isinstance(only_cross, list) else [only_cross]):
        raise ConversionError(f"{source}: only_cross_attention is not supported")
    layers = config.get("layers_per_block", 2)
    params = {"image_size": config.get("sample_size") or 32, "in_channels": config["in_channels"],
              "out_channels": config["out_channels"], "model_channels": mc,
              "channel_mult": [c // mc for c in channels], "num_res_blocks": layers,
              "attention_resolutions": [2 ** i for i, a in enumerate(attn) if a], "dropout": config.get("dropout", 0.0),
              "use_scale_shift_norm": config.get("resnet_time_scale_shift", "default") == "scale_shift",
              "num_classes": config.get("num_class_embeds"), "legacy": False,
              **({} if config.get("norm_num_groups", 32) == 32 else {"norm_num_groups": config["norm_num_groups"]}),
              **_heads_params(config, channels, attn, source)}
    if name == COND:
        depth = config.get("transformer_layers_per_block", 1)
        if not isinstance(depth, int):
            if len(set(depth)) != 1:
                raise ConversionError(f"{source}: transformer_layers_per_block {depth} must be one value")
            depth = depth[0]
        params.update(use_spatial_transformer=True, context_dim=config["cross_attention_dim"],
                      transformer_depth=depth, use_linear_in_transformer=bool(config.get("use_linear_projection")))
    return params

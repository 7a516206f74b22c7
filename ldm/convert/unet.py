"""Our UNetModel state dict (CompVis keys, `model.diffusion_model.*` without the prefix) <-> diffusers'
UNet2DConditionModel / UNet2DModel.

Module correspondence: `input_blocks.0.0` = conv_in; level L's n-th ResBlock / attention = down_blocks.L.resnets.n /
attentions.n; its downsampler `input_blocks.k.0.op` = down_blocks.L.downsamplers.0.conv; middle_block.{0,1,2} =
mid_block.{resnets.0, attentions.0, resnets.1}; output level L = up_blocks.(levels-1-L) with `.conv` of the last
block's Upsample = upsamplers.0.conv; `out.{0,2}` = conv_norm_out / conv_out; `time_embed.{0,2}` =
time_embedding.linear_{1,2}; `label_emb` = class_embedding. SpatialTransformers keep their inner names; the plain
AttentionBlock's fused `qkv` (Conv1d) is split into to_q / to_k / to_v (Linear).
"""
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ldm.convert.keymap import SAME, ConvAsLinear, Kind, ModulePair, Renamed, StateDict, to_ours, to_theirs
from ldm.convert.unet_config import level_has_attention, level_heads, unet_params

RESBLOCK = Renamed({"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"})
_ATTN_NAMES = {"norm": "group_norm", "proj_out": "to_out.0"}


@dataclass(frozen=True)
class FusedQKV(Kind):
    """AttentionBlock (`norm`, `qkv` Conv1d C->3C, `proj_out` Conv1d) <-> diffusers Attention (`group_norm`,
    `to_q`, `to_k`, `to_v`, `to_out.0`, Linear). qkv channel order: heads first (legacy), or q/k/v first."""

    heads: int
    new_order: bool

    def _split_shape(self, c3: int) -> tuple[int, int, int]:
        d = c3 // (3 * self.heads)
        return (3, self.heads, d) if self.new_order else (self.heads, 3, d)

    def to_theirs(self, sub: StateDict) -> StateDict:
        rest = {k: v for k, v in sub.items() if not k.startswith("qkv.")}
        out = ConvAsLinear(_ATTN_NAMES, ("proj_out",), conv_dims=1).to_theirs(rest)
        for tensor in ("weight", "bias"):
            qkv = sub[f"qkv.{tensor}"]                                           # (3C, C, 1) / (3C,)
            parts = qkv.reshape(*self._split_shape(qkv.shape[0]), *qkv.shape[1:2])  # (3, H, D[, C]) / (H, 3, D[, C])
            for j, name in enumerate(("to_q", "to_k", "to_v")):
                part = parts[j] if self.new_order else parts[:, j]               # (H, D[, C])
                out[f"{name}.{tensor}"] = part.reshape(-1, *qkv.shape[1:2])     # (C[, C])
        return out

    def to_ours(self, sub: StateDict) -> StateDict:
        qkv_names = [f"{n}.{t}" for n in ("to_q", "to_k", "to_v") for t in ("weight", "bias")]
        out = ConvAsLinear(_ATTN_NAMES, ("proj_out",), conv_dims=1).to_ours(
            {k: v for k, v in sub.items() if k not in qkv_names})
        for tensor in ("weight", "bias"):
            q, k, v = (sub[f"{n}.{tensor}"] for n in ("to_q", "to_k", "to_v"))  # (C[, C]) each
            d = q.shape[0] // self.heads
            parts = [t.reshape(self.heads, d, *t.shape[1:]) for t in (q, k, v)]       # (H, D[, C]) each
            fused = torch.stack(parts, dim=0 if self.new_order else 1)          # (3, H, D[, C]) / (H, 3, D[, C])
            fused = fused.reshape(-1, *q.shape[1:])                              # (3C[, C])
            out[f"qkv.{tensor}"] = fused[..., None] if tensor == "weight" else fused  # Conv1d: (3C, C, 1)
        return out


def _attention_kind(p: Mapping[str, Any], channels: int, up: bool = False) -> Kind:
    if p["use_spatial_transformer"]:
        return SAME
    return FusedQKV(level_heads(p, channels, up), bool(p["use_new_attention_order"]))


def _down_pairs(p: Mapping[str, Any], levels: int) -> list[ModulePair]:
    pairs, n = [], 1
    for level in range(levels):
        ch = p["model_channels"] * p["channel_mult"][level]
        for i in range(p["num_res_blocks"][level]):
            pairs.append(ModulePair(f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{i}", RESBLOCK))
            if level_has_attention(p, level):
                pairs.append(ModulePair(f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{i}",
                                        _attention_kind(p, ch)))
            n += 1
        if level != levels - 1:
            pairs.append(ModulePair(f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
            n += 1
    return pairs


def _up_pairs(p: Mapping[str, Any], levels: int) -> list[ModulePair]:
    pairs, n = [], 0
    for u, level in enumerate(reversed(range(levels))):
        ch = p["model_channels"] * p["channel_mult"][level]
        for i in range(p["num_res_blocks"][level] + 1):
            pairs.append(ModulePair(f"output_blocks.{n}.0", f"up_blocks.{u}.resnets.{i}", RESBLOCK))
            layer = 1
            if level_has_attention(p, level):
                pairs.append(ModulePair(f"output_blocks.{n}.1", f"up_blocks.{u}.attentions.{i}",
                                        _attention_kind(p, ch, up=True)))
                layer = 2
            if level and i == p["num_res_blocks"][level]:
                pairs.append(ModulePair(f"output_blocks.{n}.{layer}.conv", f"up_blocks.{u}.upsamplers.0.conv"))
            n += 1
    return pairs


def unet_pairs(params: Mapping[str, Any]) -> list[ModulePair]:
    """The module correspondence of the U-Net described by our `unet_config.params`."""
    p = unet_params(params)
    levels = len(p["channel_mult"])
    top = p["model_channels"] * p["channel_mult"][-1]
    pairs = [ModulePair("time_embed.0", "time_embedding.linear_1"), ModulePair("time_embed.2", "time_embedding.linear_2"),
             ModulePair("input_blocks.0.0", "conv_in"), ModulePair("out.0", "conv_norm_out"),
             ModulePair("out.2", "conv_out"),
             ModulePair("middle_block.0", "mid_block.resnets.0", RESBLOCK),
             ModulePair("middle_block.1", "mid_block.attentions.0", _attention_kind(p, top)),
             ModulePair("middle_block.2", "mid_block.resnets.1", RESBLOCK)]
    if p["num_classes"] is not None:
        pairs.append(ModulePair("label_emb", "class_embedding"))
    return pairs + _down_pairs(p, levels) + _up_pairs(p, levels)


def unet_to_diffusers(sd: Mapping[str, torch.Tensor], params: Mapping[str, Any], source: str = "unet") -> StateDict:
    return to_theirs(sd, unet_pairs(params), source)


def unet_from_diffusers(sd: Mapping[str, torch.Tensor], params: Mapping[str, Any], source: str = "unet") -> StateDict:
    return to_ours(sd, unet_pairs(params), source)

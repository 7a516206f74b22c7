"""Encoder and Decoder of the first-stage autoencoder (CompVis key layout, downsampling f = 2^(len(ch_mult)-1)).

Both take the same `ddconfig` mapping; each ignores the other's keys (Encoder: out_ch, give_pre_end,
tanh_out; Decoder: double_z) and rejects anything else with an error naming the key.
`norm_type` (ours, default "group" as in CompVis; "none" for small fast-training nets) is described in
`blocks.Normalize`.
"""
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.autoencoder.blocks import AttnBlock, Downsample, Normalize, ResnetBlock, Upsample
from ldm.util import ConfigError

DDCONFIG_KEYS = {"ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv",
                 "in_channels", "resolution", "z_channels", "double_z", "use_linear_attn", "attn_type",
                 "give_pre_end", "tanh_out", "norm_type"}


def _check_ignored(owner: str, ignored: dict[str, Any]) -> None:
    unknown = sorted(k for k in ignored if k not in DDCONFIG_KEYS)
    if unknown:
        raise ConfigError(f"{owner}: unknown ddconfig key(s) {unknown}; accepted: {sorted(DDCONFIG_KEYS)}")


def check_multiple_of_f(x: torch.Tensor, f: int, owner: str) -> None:
    """ValueError unless the input's height and width are multiples of the downsampling factor f."""
    h, w = x.shape[-2:]
    if h % f or w % f:
        raise ValueError(f"{owner}: image size {h}x{w} (HxW) is not a multiple of the downsampling factor f={f} "
                         f"(2 ** (len(ch_mult) - 1)); crop or resize the images to multiples of {f}, e.g. "
                         f"{max(f, h // f * f)}x{max(f, w // f * f)} (data.params.*.params.size)")


def make_attn(channels: int, attn_type: str, norm_type: str = "group") -> nn.Module:
    """`vanilla` (also CompVis' `vanilla-xformers`: same weights) self-attention, or `none` (identity)."""
    if attn_type in ("vanilla", "vanilla-xformers"):
        return AttnBlock(channels, norm_type)
    if attn_type == "none":
        return nn.Identity()
    raise ConfigError(f"ddconfig.attn_type={attn_type!r} is not supported (CompVis' linear attention included); "
                      f"use 'vanilla' or 'none'")


def _attn_type(attn_type: str, use_linear_attn: bool) -> str:
    return "linear" if use_linear_attn else attn_type


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> moments (B, 2*z_channels if double_z else z_channels, H/f, W/f)."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 use_linear_attn: bool = False, attn_type: str = "vanilla", norm_type: str = "group",
                 **ignore: Any):
        super().__init__()
        _check_ignored("Encoder", ignore)
        attn_type = _attn_type(attn_type, use_linear_attn)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout, norm_type))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(make_attn(block_in, attn_type, norm_type))
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, norm_type)
        self.mid.attn_1 = make_attn(block_in, attn_type, norm_type)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, norm_type)
        self.norm_out = Normalize(block_in, norm_type)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, padding=1)

    @property
    def downsampling_factor(self) -> int:
        """f: an (H, W) image gives (H/f, W/f) latents."""
        return 2 ** (self.num_resolutions - 1)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Moments, and with return_features the per-level features: level L is (B, ch*ch_mult[L], H/2^L, W/2^L),
        taken after the level's blocks, before its downsampling."""
        check_multiple_of_f(x, self.downsampling_factor, "Encoder")
        features = []
        h = self.conv_in(x)                                        # (B, ch, H, W)
        for i_level, level in enumerate(self.down):
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            features.append(h)                                     # (B, ch*ch_mult[L], H/2^L, W/2^L)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)                            # (B, C, H/2^(L+1), W/2^(L+1))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))  # (B, C_top, H/f, W/f)
        h = self.conv_out(F.silu(self.norm_out(h)))                # (B, (2)z_channels, H/f, W/f)
        return (h, features) if return_features else h


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f).

    forward = forward_mid -> forward_up_level for each level from the coarsest (len(ch_mult)-1) to 0 ->
    forward_out; a subclass can fuse extra features between levels (e.g. StableSR's CFW) by overriding forward.
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int | None = None, resolution: int, z_channels: int, give_pre_end: bool = False,
                 tanh_out: bool = False, use_linear_attn: bool = False, attn_type: str = "vanilla", norm_type: str = "group",
                 **ignore: Any):
        super().__init__()
        _check_ignored("Decoder", ignore)
        attn_type = _attn_type(attn_type, use_linear_attn)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, norm_type)
        self.mid.attn_1 = make_attn(block_in, attn_type, norm_type)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, norm_type)
        levels = []
        for i_level in reversed(range(self.num_resolutions)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, dropout, norm_type))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(make_attn(block_in, attn_type, norm_type))
            if i_level != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            levels.insert(0, level)                                # up[0] is full resolution
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in, norm_type)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, padding=1)

    def forward_mid(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)                                        # (B, ch*ch_mult[-1], h, w)
        return self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))

    def forward_up_level(self, h: torch.Tensor, i_level: int) -> torch.Tensor:
        """Level `i_level`'s blocks (and its upsampling unless level 0): (B, C, H, W) -> (B, C', 2H, 2W)."""
        level = self.up[i_level]
        for i_block, block in enumerate(level.block):
            h = block(h)                                           # (B, ch*ch_mult[L], H, W)
            if len(level.attn) > 0:
                h = level.attn[i_block](h)
        return level.upsample(h) if i_level != 0 else h

    def forward_out(self, h: torch.Tensor) -> torch.Tensor:
        if self.give_pre_end:
            return h
        h = self.conv_out(F.silu(self.norm_out(h)))                # (B, out_ch, H, W)
        return torch.tanh(h) if self.tanh_out else h

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.forward_mid(z)
        for i_level in reversed(range(self.num_resolutions)):
            h = self.forward_up_level(h, i_level)
        return self.forward_out(h)

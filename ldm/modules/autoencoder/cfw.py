"""StableSR's controllable feature wrapping (CFW): a decoder that fuses encoder features of the LR input.

At decoder levels 1 .. L-2 (not the coarsest, not full resolution), after the level's ResNet blocks and before
its upsampling, the decoder feature F_d is corrected with the encoder's feature F_e of the same level:

    F_m = F_d + w * C(concat(F_e, F_d)),   C = ResBlock(2C -> C) -> RRDB x num_fuse_block -> ResBlock(C -> C)

w in [0, 1] trades fidelity to the LR input (w -> 1) against the diffusion output's realism (w -> 0); w = 0
is the plain decoder. Module names follow StableSR's `Decoder_Mix` / `Fuse_sft_block_RRDB` and basicsr's RRDB
(`decoder.fusion_layer_{i}.encode_enc_{1,2,3}`, `.rdb{1,2,3}.conv{1..5}`), so its CFW checkpoint loads strictly.
"""
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.autoencoder.blocks import Normalize
from ldm.modules.autoencoder.model import Decoder


class FuseResBlock(nn.Module):
    """norm -> SiLU -> conv3x3 -> norm -> SiLU -> conv3x3, plus a 1x1 `conv_out` skip when channels change."""

    def __init__(self, in_channels: int, out_channels: int, norm_type: str = "group"):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels, norm_type)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = Normalize(out_channels, norm_type)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.conv_out = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                      # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))                      # (B, C_out, H, W)
        return h + (self.conv_out(x) if self.in_channels != self.out_channels else x)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs (ESRGAN): conv_k sees the input and all earlier outputs; x + 0.2 * conv5."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32):
        super().__init__()
        for k in range(1, 6):
            out = num_feat if k == 5 else num_grow_ch
            setattr(self, f"conv{k}", nn.Conv2d(num_feat + (k - 1) * num_grow_ch, out, kernel_size=3, padding=1))
        for k in range(1, 6):                                      # ESRGAN init: Kaiming normal x 0.1, zero bias
            conv = getattr(self, f"conv{k}")
            nn.init.kaiming_normal_(conv.weight)
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for k in range(1, 5):
            feats.append(F.leaky_relu(getattr(self, f"conv{k}")(torch.cat(feats, 1)), 0.2))  # (B, grow, H, W)
        return x + 0.2 * self.conv5(torch.cat(feats, 1))           # (B, num_feat, H, W)


class RRDB(nn.Module):
    """Residual-in-residual dense block: three ResidualDenseBlocks, x + 0.2 * their output."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class FusionBlock(nn.Module):
    """C(concat(F_e, F_d)) and F_d + w * C (StableSR's Fuse_sft_block_RRDB)."""

    def __init__(self, channels: int, num_block: int = 2, num_grow_ch: int = 32, norm_type: str = "group"):
        super().__init__()
        self.encode_enc_1 = FuseResBlock(2 * channels, channels, norm_type)
        self.encode_enc_2 = nn.Sequential(*[RRDB(channels, num_grow_ch) for _ in range(num_block)])
        self.encode_enc_3 = FuseResBlock(channels, channels, norm_type)

    def forward(self, enc_feat: torch.Tensor, dec_feat: torch.Tensor, w: float = 1.0) -> torch.Tensor:
        g = self.encode_enc_1(torch.cat([enc_feat, dec_feat], dim=1))  # (B, C, H, W)
        g = self.encode_enc_3(self.encode_enc_2(g))                    # (B, C, H, W)
        return dec_feat + w * g


class FusionDecoder(Decoder):
    """Decoder with a FusionBlock `fusion_layer_{i}` at each level i in 1 .. len(ch_mult) - 2 (StableSR's
    Decoder_Mix); forward(z, enc_features, w) with enc_features the Encoder's per-level list
    (`Encoder(x, return_features=True)`), w defaulting to `fusion_w`."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int | None = None, resolution: int, z_channels: int, give_pre_end: bool = False,
                 tanh_out: bool = False, use_linear_attn: bool = False, attn_type: str = "vanilla",
                 norm_type: str = "group", num_fuse_block: int = 2, fusion_w: float = 1.0, **ignore: Any):
        super().__init__(ch=ch, out_ch=out_ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                         attn_resolutions=attn_resolutions, dropout=dropout, resamp_with_conv=resamp_with_conv,
                         in_channels=in_channels, resolution=resolution, z_channels=z_channels,
                         give_pre_end=give_pre_end, tanh_out=tanh_out, use_linear_attn=use_linear_attn,
                         attn_type=attn_type, norm_type=norm_type, **ignore)
        self.fusion_w = fusion_w
        self.fusion_levels = tuple(range(1, self.num_resolutions - 1))   # not the coarsest, not full resolution
        for i in self.fusion_levels:
            setattr(self, f"fusion_layer_{i}", FusionBlock(ch * ch_mult[i], num_fuse_block, norm_type=norm_type))

    def forward(self, z: torch.Tensor, enc_features: Sequence[torch.Tensor] | None = None,
                w: float | None = None) -> torch.Tensor:
        """z (B, z_channels, h, w) -> image; without features, or with w = 0, the plain decoder's output."""
        w = self.fusion_w if w is None else w
        h = self.forward_mid(z)                                    # (B, C_top, h, w)
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block, block in enumerate(level.block):
                h = block(h)                                       # (B, ch*ch_mult[L], H/2^L, W/2^L)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level in self.fusion_levels and enc_features is not None and w != 0:
                h = getattr(self, f"fusion_layer_{i_level}")(self._feature(enc_features, i_level, h), h, w)
            if i_level != 0:
                h = level.upsample(h)                              # (B, C, 2H, 2W)
        return self.forward_out(h)

    def _feature(self, enc_features: Sequence[torch.Tensor], i_level: int, h: torch.Tensor) -> torch.Tensor:
        if len(enc_features) <= i_level or enc_features[i_level].shape != h.shape:
            got = tuple(enc_features[i_level].shape) if len(enc_features) > i_level else "nothing"
            raise ValueError(f"FusionDecoder: fusion_layer_{i_level} needs the encoder's level-{i_level} feature "
                             f"of shape {tuple(h.shape)}, got {got}; pass Encoder(x, return_features=True)[1] of the "
                             f"LR image upsampled to the output size")
        return enc_features[i_level]

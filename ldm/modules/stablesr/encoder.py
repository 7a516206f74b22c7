"""The time-aware encoder of StableSR (`EncoderUNetModelWT`): the contracting half of a U-Net, with its own timestep
embedding, fed the clean latent of the (upsampled) LR image; it returns one feature map per U-Net resolution.

Layout (keys as in the released checkpoint, `structcond_stage_model.*`): `time_embed.{0,2}` (sinusoidal(mc) ->
4 mc -> 4 mc), `input_blocks.0.0` (3x3 conv in -> mc), per level `num_res_blocks` ResBlocks (+ an AttentionBlock
where the downsampling factor is in `attention_resolutions`) and a 2x downsample `input_blocks.N.0.op` (not after
the last level), `middle_block.{0,1,2}` (ResBlock, AttentionBlock, ResBlock), and `fea_tran.i`: one ResBlock
C_i -> out_channels per output, for the features entering each downsample and the middle block's output.
Output: {str(width): (B, out_channels, H_i, W_i)}, e.g. '64', '32', '16', '8' for a 64x64 latent; the time
embedding enters every ResBlock (heads included) as a per-channel bias.
"""
from typing import Sequence

import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.attention import AttentionBlock
from ldm.modules.diffusionmodules.embeddings import timestep_embedding
from ldm.modules.diffusionmodules.layers import NUM_GROUPS, Downsample
from ldm.modules.diffusionmodules.resblock import ResBlock
from ldm.modules.diffusionmodules.unet import TimestepEmbedSequential
from ldm.util import ConfigError


class TimeAwareEncoder(nn.Module):
    """z_lr (B, in_channels, h, w), timesteps (B,) -> {str(width): (B, out_channels, h / 2^i, w / 2^i)}.

    Params follow ADM's EncoderUNetModel (as StableSR's YAML gives them); `image_size`, `dims` (2), `use_fp16` and
    `num_heads_upsample` are accepted for compatibility and unused. `norm_num_groups` (ours) sets GroupNorm groups.
    """

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, num_res_blocks: int,
                 attention_resolutions: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 use_checkpoint: bool = False, use_fp16: bool = False, num_heads: int = 1,
                 num_head_channels: int = -1, num_heads_upsample: int = -1, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, use_new_attention_order: bool = False,
                 norm_num_groups: int = NUM_GROUPS, image_size: int | None = None):
        super().__init__()
        if dims != 2:
            raise ConfigError(f"TimeAwareEncoder: dims={dims} is not supported; only 2-D latents (dims=2)")
        if not isinstance(num_res_blocks, int) or num_res_blocks < 1:
            raise ConfigError(f"TimeAwareEncoder: num_res_blocks must be a positive int, got {num_res_blocks!r}")
        self.in_channels, self.model_channels, self.out_channels = in_channels, model_channels, out_channels
        self.channel_mult, self.attention_resolutions = tuple(channel_mult), tuple(attention_resolutions)
        self._block_args = dict(dropout=dropout, use_scale_shift_norm=use_scale_shift_norm,
                                use_checkpoint=use_checkpoint, norm_num_groups=norm_num_groups)
        self._attn_args = dict(num_heads=num_heads, num_head_channels=num_head_channels,
                               use_new_attention_order=use_new_attention_order, use_checkpoint=use_checkpoint,
                               norm_num_groups=norm_num_groups)
        emb = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        feature_channels = self._build_input_blocks(num_res_blocks, conv_resample, resblock_updown)
        ch = feature_channels[-1]
        self.middle_block = TimestepEmbedSequential(self._resblock(ch, ch), AttentionBlock(ch, **self._attn_args),
                                                    self._resblock(ch, ch))
        self.fea_tran = nn.ModuleList(self._resblock(c, out_channels) for c in feature_channels)

    def _resblock(self, channels: int, out_channels: int, down: bool = False) -> ResBlock:
        return ResBlock(channels, 4 * self.model_channels, out_channels=out_channels, down=down, **self._block_args)

    def _build_input_blocks(self, num_res_blocks: int, conv_resample: bool, resblock_updown: bool) -> list[int]:
        """Create `input_blocks`; return the channels of each output feature (before each downsample, middle)."""
        mc = self.model_channels
        blocks = [TimestepEmbedSequential(nn.Conv2d(self.in_channels, mc, kernel_size=3, padding=1))]
        self._taps: list[int] = []          # indices of the downsample blocks: their input is an output feature
        features, ch, ds = [], mc, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers = [self._resblock(ch, mult * mc)]
                ch = mult * mc
                if ds in self.attention_resolutions:
                    layers.append(AttentionBlock(ch, **self._attn_args))
                blocks.append(TimestepEmbedSequential(*layers))
            if level != len(self.channel_mult) - 1:
                self._taps.append(len(blocks))
                features.append(ch)
                down = self._resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                blocks.append(TimestepEmbedSequential(down))
                ds *= 2
        self.input_blocks = nn.ModuleList(blocks)
        return features + [ch]

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"TimeAwareEncoder: x must be (B, {self.in_channels}, H, W) with H, W divisible by "
                             f"{factor}, got {tuple(x.shape)}")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.model_channels)              # (B, mc)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))       # (B, 4 mc)
        taps, h = [], x
        for i, block in enumerate(self.input_blocks):
            if i in self._taps:
                taps.append(h)                                                  # (B, C_i, H_i, W_i)
            h = block(h, emb)
        taps.append(self.middle_block(h, emb))                                  # (B, C_mid, H / f, W / f)
        out = {}
        for head, feature in zip(self.fea_tran, taps):
            out[str(feature.shape[-1])] = head(feature, emb)                    # (B, out_channels, H_i, W_i)
        return out

"""Time-conditioned U-Net with optional cross-attention: the LDM / Stable Diffusion 1.x and 2.x denoiser.

Module names follow the CompVis checkpoint layout (REFERENCE.md §2), so `model.diffusion_model.*` weights of
published files load with strict=True. Every `unet_config.params` key of the CompVis, SD 1.x and SD 2.x YAMLs is
accepted; values this implementation does not support raise a ConfigError that names them.
"""
import warnings
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.attention import AttentionBlock, SpatialTransformer
from ldm.modules.diffusionmodules.embeddings import timestep_embedding
from ldm.modules.diffusionmodules.layers import NUM_GROUPS, Downsample, Upsample, normalization, zero_module
from ldm.modules.diffusionmodules.resblock import Modulation, ResBlock
from ldm.util import ConfigError, default


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that gives ResBlocks the time embedding (and their SFT modulation, keyed by layer index)
    and SpatialTransformers the context; other layers get the features only."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                modulations: Mapping[int, Modulation] | None = None) -> torch.Tensor:
        for i, layer in enumerate(self):
            if isinstance(layer, ResBlock):
                x = layer(x, emb, modulations.get(i) if modulations else None)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _per_level(value, levels: int, name: str) -> list:
    """An int/bool applied to every level, or a list with one entry per level of channel_mult."""
    if isinstance(value, (int, bool)):
        return [value] * levels
    if len(value) != levels:
        raise ConfigError(f"UNetModel: {name}={list(value)} must have one entry per level of channel_mult ({levels})")
    return list(value)


def _label_embedding(num_classes, adm_in_channels: int | None, dim: int) -> nn.Module:
    """`label_emb`: nn.Embedding for an int number of classes, or SD 2.x's "sequential" MLP on adm vectors."""
    if num_classes == "sequential":
        if adm_in_channels is None:
            raise ConfigError("UNetModel: num_classes='sequential' needs adm_in_channels")
        return nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, dim), nn.SiLU(), nn.Linear(dim, dim)))
    if isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes > 0:
        return nn.Embedding(num_classes, dim)
    raise ConfigError(f"UNetModel: num_classes={num_classes!r} is not supported; use a positive int "
                      f"(class labels y of shape (B,)) or 'sequential' with adm_in_channels")


def _check_config(dims, n_embed, num_heads, num_head_channels, use_spatial_transformer, context_dim,
                  transformer_depth, num_classes, adm_in_channels, use_fp16) -> None:
    """Reject values this U-Net does not implement, naming the key."""
    if dims != 2:
        raise ConfigError(f"UNetModel: dims={dims} is not supported; only 2-D images (dims=2)")
    if n_embed is not None:
        raise ConfigError("UNetModel: n_embed (predicting first-stage codebook ids) is not supported; remove it")
    if (num_heads == -1) == (num_head_channels == -1):
        raise ConfigError(f"UNetModel: set exactly one of num_heads ({num_heads}) and num_head_channels "
                          f"({num_head_channels}); the other must be -1")
    if context_dim is not None and not use_spatial_transformer:
        raise ConfigError("UNetModel: context_dim is set but use_spatial_transformer is False; "
                          "cross-attention needs use_spatial_transformer: true")
    if context_dim is not None and not isinstance(context_dim, int):
        raise ConfigError(f"UNetModel: context_dim={context_dim!r} must be an int")
    if not isinstance(transformer_depth, int) or transformer_depth < 1:
        raise ConfigError(f"UNetModel: transformer_depth={transformer_depth!r} must be a positive int")
    if adm_in_channels is not None and num_classes != "sequential":
        raise ConfigError("UNetModel: adm_in_channels is only used with num_classes='sequential'")
    if use_fp16:
        warnings.warn("UNetModel: use_fp16=True has no effect here; choose precision in the trainer "
                      "(precision: 16-mixed or bf16-mixed), as CompVis/SD ran these configs under autocast",
                      stacklevel=3)


class UNetModel(nn.Module):
    """eps/x0/v-predicting U-Net: x (B, in_channels, H, W), timesteps (B,) -> (B, out_channels, H, W).

    Levels: one per `channel_mult` entry, each with `num_res_blocks` ResBlocks (+ attention when the level's
    downsampling factor is in `attention_resolutions`), then a 2x downsample (not on the last level); a middle
    ResBlock-attention-ResBlock; the mirrored decoder with skip connections. Attention is a SpatialTransformer
    (cross-attending to `context`) with `use_spatial_transformer`, else a plain self-attention AttentionBlock.
    Heads: exactly one of `num_heads` / `num_head_channels`; with num_head_channels and `legacy`, a transformer's
    head width is ch // (ch // num_head_channels) as in CompVis. `num_heads_upsample` sets the heads of the
    decoder's AttentionBlocks. `image_size` is informational (any H, W divisible by 2^(levels-1) works).
    SD 2.x keys: `disable_self_attentions` (per level), `num_attention_blocks` (per level),
    `disable_middle_self_attn`, `use_linear_in_transformer`, `adm_in_channels` (num_classes='sequential').
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int | Sequence[int], attention_resolutions: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes: int | str | None = None, use_checkpoint: bool = False, use_fp16: bool = False,
                 num_heads: int = -1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, use_spatial_transformer: bool = False,
                 transformer_depth: int = 1, context_dim: int | None = None, n_embed: int | None = None,
                 legacy: bool = True, disable_self_attentions: Sequence[bool] | None = None,
                 num_attention_blocks: Sequence[int] | None = None, disable_middle_self_attn: bool = False,
                 use_linear_in_transformer: bool = False, adm_in_channels: int | None = None,
                 norm_num_groups: int = NUM_GROUPS):
        super().__init__()
        _check_config(dims, n_embed, num_heads, num_head_channels, use_spatial_transformer, context_dim,
                      transformer_depth, num_classes, adm_in_channels, use_fp16)
        levels = len(channel_mult)
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.channel_mult = model_channels, tuple(channel_mult)
        self.num_res_blocks = _per_level(num_res_blocks, levels, "num_res_blocks")
        self.attention_resolutions = tuple(attention_resolutions)
        self.num_attention_blocks = None if num_attention_blocks is None else _per_level(
            num_attention_blocks, levels, "num_attention_blocks")
        self.disable_self_attentions = _per_level(default(disable_self_attentions, False), levels,
                                                  "disable_self_attentions")
        self.dropout, self.conv_resample, self.num_classes = dropout, conv_resample, num_classes
        self.use_checkpoint, self.use_scale_shift_norm = use_checkpoint, use_scale_shift_norm
        self.resblock_updown, self.legacy = resblock_updown, legacy
        self.num_heads, self.num_head_channels = num_heads, num_head_channels
        self.num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.use_new_attention_order, self.use_spatial_transformer = use_new_attention_order, use_spatial_transformer
        self.transformer_depth, self.context_dim = transformer_depth, context_dim
        self.disable_middle_self_attn, self.use_linear_in_transformer = disable_middle_self_attn, use_linear_in_transformer
        self.norm_num_groups = norm_num_groups  # ours (diffusers' name); CompVis fixes 32

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        if num_classes is not None:
            self.label_emb = _label_embedding(num_classes, adm_in_channels, time_embed_dim)
        skip_channels = self._build_input_blocks()
        ch = skip_channels[-1]
        self.middle_block = TimestepEmbedSequential(
            self._resblock(ch, ch), self._attention(ch, level=levels - 1, middle=True), self._resblock(ch, ch))
        ch = self._build_output_blocks(skip_channels, ch)
        self.out = nn.Sequential(normalization(ch, num_groups=norm_num_groups), nn.SiLU(),
                                 zero_module(nn.Conv2d(model_channels, out_channels, kernel_size=3, padding=1)))
        self.resblock_names = tuple(name for name, m in self.named_modules() if isinstance(m, ResBlock))

    # ----------------------------------------------------------------------------------------- construction
    def _resblock(self, channels: int, out_channels: int, up: bool = False, down: bool = False) -> ResBlock:
        return ResBlock(channels, self.model_channels * 4, self.dropout, out_channels,
                        use_scale_shift_norm=self.use_scale_shift_norm, use_checkpoint=self.use_checkpoint,
                        up=up, down=down, norm_num_groups=self.norm_num_groups)

    def _attention(self, ch: int, level: int, up: bool = False, middle: bool = False) -> nn.Module:
        """The attention layer at `ch` channels: SpatialTransformer or AttentionBlock."""
        if not self.use_spatial_transformer:
            heads = self.num_heads_upsample if up else self.num_heads
            return AttentionBlock(ch, heads, self.num_head_channels, self.use_new_attention_order,
                                  self.use_checkpoint, self.norm_num_groups)
        if self.num_head_channels == -1:
            heads, dim_head = self.num_heads, ch // self.num_heads
        else:
            heads = ch // self.num_head_channels
            if heads == 0:
                raise ConfigError(f"UNetModel: num_head_channels={self.num_head_channels} exceeds {ch} channels")
            dim_head = ch // heads if self.legacy else self.num_head_channels
        disable_sa = self.disable_middle_self_attn if middle else self.disable_self_attentions[level]
        return SpatialTransformer(ch, heads, dim_head, depth=self.transformer_depth, context_dim=self.context_dim,
                                  disable_self_attn=disable_sa, use_linear=self.use_linear_in_transformer,
                                  use_checkpoint=self.use_checkpoint, norm_num_groups=self.norm_num_groups)

    def _has_attention(self, ds: int, level: int, index: int) -> bool:
        limit = self.num_attention_blocks
        return ds in self.attention_resolutions and (limit is None or index < limit[level])

    def _build_input_blocks(self) -> list[int]:
        """Create `input_blocks`; return the channel count of each block's output (the skip connections)."""
        mc = self.model_channels
        blocks = [TimestepEmbedSequential(nn.Conv2d(self.in_channels, mc, kernel_size=3, padding=1))]
        skip_channels, ch, ds = [mc], mc, 1
        for level, mult in enumerate(self.channel_mult):
            for index in range(self.num_res_blocks[level]):
                layers = [self._resblock(ch, mult * mc)]
                ch = mult * mc
                if self._has_attention(ds, level, index):
                    layers.append(self._attention(ch, level))
                blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                down = self._resblock(ch, ch, down=True) if self.resblock_updown else Downsample(ch, self.conv_resample)
                blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2
        self.input_blocks = nn.ModuleList(blocks)
        return skip_channels

    def _build_output_blocks(self, skip_channels: list[int], ch: int) -> int:
        """Create `output_blocks` (consuming `skip_channels` from the end); return the final channel count."""
        mc, skip_channels = self.model_channels, list(skip_channels)
        ds = 2 ** (len(self.channel_mult) - 1)
        blocks = []
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for index in range(self.num_res_blocks[level] + 1):
                layers = [self._resblock(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if self._has_attention(ds, level, index):
                    layers.append(self._attention(ch, level, up=True))
                if level and index == self.num_res_blocks[level]:
                    up = self._resblock(ch, ch, up=True) if self.resblock_updown else Upsample(ch, self.conv_resample)
                    layers.append(up)
                    ds //= 2
                blocks.append(TimestepEmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(blocks)
        return ch

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context=None, y: torch.Tensor | None = None,
                modulations: Mapping[str, Modulation] | None = None) -> torch.Tensor:
        """x (B, C_in, H, W), timesteps (B,) or a scalar (ints or floats) -> (B, C_out, H, W).

        context: (B, L, context_dim), or a list of such tensors joined along L (CompVis passes lists).
        y: class labels (B,) when num_classes is an int; adm vectors (B, adm_in_channels) for 'sequential'.
        modulations: optional SFT per ResBlock, {name in `resblock_names` (e.g. 'input_blocks.1.0',
        'middle_block.2'): (alpha, beta), or a callable h -> (alpha, beta) or h -> h'}, applied to the block's
        residual branch output h; see resblock.apply_modulation.
        """
        timesteps, context = self._check_inputs(x, timesteps, context, y)
        grouped = self._group_modulations(modulations)
        t_emb = timestep_embedding(timesteps, self.model_channels)                 # (B, mc)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))          # (B, 4*mc)
        if self.num_classes is not None:
            emb = emb + self.label_emb(y).to(emb.dtype)                            # (B, 4*mc)
        skips, h = [], x
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context, grouped.get(f"input_blocks.{i}"))           # (B, C_i, H_i, W_i)
            skips.append(h)
        h = self.middle_block(h, emb, context, grouped.get("middle_block"))      # (B, C_mid, H/f, W/f)
        for i, block in enumerate(self.output_blocks):
            h = torch.cat([h, skips.pop()], dim=1)                                  # (B, C + C_skip, H_i, W_i)
            h = block(h, emb, context, grouped.get(f"output_blocks.{i}"))          # (B, C_i, H_i', W_i')
        return self.out(h)                                                          # (B, C_out, H, W)

    def _check_inputs(self, x, timesteps, context, y) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate the forward arguments; return timesteps as (B,) and context as one tensor (or None)."""
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"UNetModel: x must be (B, {self.in_channels}, H, W) with H, W divisible by {factor}, "
                             f"got {tuple(x.shape)}")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"UNetModel: timesteps must be (B,) = ({x.shape[0]},), got {tuple(timesteps.shape)}")
        if (y is None) != (self.num_classes is None):
            raise ValueError("UNetModel: pass y if and only if the model is class-conditional "
                             f"(num_classes={self.num_classes!r}, y {'missing' if y is None else 'given'})")
        if y is not None and y.shape[0] != x.shape[0]:
            raise ValueError(f"UNetModel: y has batch size {y.shape[0]}, x has {x.shape[0]}")
        if isinstance(context, (list, tuple)):
            context = torch.cat(list(context), dim=1)                                # (B, L_total, context_dim)
        if context is not None and not self.use_spatial_transformer:
            raise ValueError("UNetModel: context was given but this model has no cross-attention "
                             "(use_spatial_transformer is False)")
        if context is None and self.context_dim is not None:
            raise ValueError(f"UNetModel: this model cross-attends to a context (context_dim={self.context_dim}); "
                             "pass context=(B, L, context_dim)")
        return timesteps, context

    def _group_modulations(self, modulations: Mapping[str, Modulation] | None) -> dict[str, dict[int, Modulation]]:
        """{'input_blocks.1.0': m} -> {'input_blocks.1': {0: m}}; unknown ResBlock names are an error."""
        if not modulations:
            return {}
        unknown = sorted(set(modulations) - set(self.resblock_names))
        if unknown:
            raise KeyError(f"UNetModel: modulations name no ResBlock: {unknown}; valid names are "
                           f"UNetModel.resblock_names, e.g. {list(self.resblock_names[:3])}")
        grouped: dict[str, dict[int, Modulation]] = {}
        for name, modulation in modulations.items():
            block, layer = name.rsplit(".", 1)
            grouped.setdefault(block, {})[int(layer)] = modulation
        return grouped

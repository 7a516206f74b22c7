"""The U-Net's time-conditioned residual block, with an optional SFT modulation hook (StableSR)."""
from typing import Any, Callable, Union

import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.layers import (NUM_GROUPS, Downsample, Upsample, checkpoint, normalization,
                                                 zero_module)

# SFT modulation of one ResBlock, applied to its residual branch's output h (after `out_layers`, i.e. after the
# second conv, before the skip add; where StableSR's released code modulates): a pair (alpha, beta) broadcastable to
# h (B, C, H, W), applied as h <- (1 + alpha) * h + beta; or a callable h -> (alpha, beta) (the same), or h -> h'
# (any transform of h, e.g. SPADE's GroupNorm(h) * (1 + gamma) + beta).
Modulation = Union[tuple[torch.Tensor, torch.Tensor], Callable[[torch.Tensor], Any]]


def apply_modulation(h: torch.Tensor, modulation: Modulation) -> torch.Tensor:
    """Spatial feature transform F^ = (1 + alpha) * F + beta (StableSR), or the callable's transformed F."""
    out = modulation(h) if callable(modulation) else modulation
    if isinstance(out, torch.Tensor) and callable(modulation):
        if out.shape != h.shape:
            raise ValueError(f"ResBlock modulation returned features of shape {tuple(out.shape)}, "
                             f"expected {tuple(h.shape)}")
        return out                                                      # (B, C, H, W)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"ResBlock modulation must be an (alpha, beta) pair or a callable returning one (or the "
                        f"modulated features), got {type(out).__name__}")
    alpha, beta = out
    return h * (1 + alpha) + beta                                       # (B, C, H, W)


class ResBlock(nn.Module):
    """norm-SiLU-conv, + time embedding, norm-SiLU-dropout-conv (zero-init), plus a skip connection.

    Keys: `in_layers.{0 norm, 2 conv}`, `emb_layers.1`, `out_layers.{0 norm, 3 conv}`, `skip_connection`
    (Identity when channels are unchanged, else a 1x1 conv, or 3x3 with `use_conv`). `up`/`down` resample
    inside the block (resblock_updown). `use_scale_shift_norm` turns the embedding into a FiLM (scale, shift).
    `modulation` (forward): SFT on the residual branch's output, before the skip add (see `Modulation`).
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, use_checkpoint: bool = False,
                 up: bool = False, down: bool = False, norm_num_groups: int = NUM_GROUPS):
        super().__init__()
        if up and down:
            raise ValueError("ResBlock: up and down cannot both be set")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(normalization(channels, num_groups=norm_num_groups), nn.SiLU(),
                                       nn.Conv2d(channels, self.out_channels, kernel_size=3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels, num_groups=norm_num_groups), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, kernel_size=3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            kernel = 3 if use_conv else 1
            self.skip_connection = nn.Conv2d(channels, self.out_channels, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, modulation: Modulation | None = None) -> torch.Tensor:
        """x (B, C, H, W), emb (B, emb_channels) -> (B, C_out, H', W'); `modulation`: optional SFT (alpha, beta)."""
        return checkpoint(self._forward, x, emb, modulation, enabled=self.use_checkpoint and self.training)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor, modulation: Modulation | None) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)                                  # (B, C, H, W)
            h = self.in_layers[-1](self.h_upd(h))                       # (B, C_out, H', W')
            x = self.x_upd(x)                                           # (B, C, H', W')
        else:
            h = self.in_layers(x)                                       # (B, C_out, H, W)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]   # (B, C_out or 2*C_out, 1, 1)
        norm, rest = self.out_layers[0], self.out_layers[1:]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)                      # (B, C_out, 1, 1) each
            h = rest(norm(h) * (1 + scale) + shift)                     # (B, C_out, H', W')
        else:
            h = rest(norm(h + emb_out))                                 # (B, C_out, H', W')
        if modulation is not None:
            h = apply_modulation(h, modulation)                         # (B, C_out, H', W')
        return self.skip_connection(x) + h                              # (B, C_out, H', W')

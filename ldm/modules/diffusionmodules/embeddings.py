"""Sinusoidal timestep embedding in the DDPM / CompVis layout: [cos, sin] halves, max period 10000."""
import math

import torch
import torch.nn.functional as F


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps (ints or floats) -> (B, dim) float32 [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half).

    An odd `dim` gets one trailing zero column.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timestep_embedding: timesteps must have shape (B,), got {tuple(timesteps.shape)}")
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half   # (half,)
    freqs = torch.exp(-math.log(max_period) * exponents)                                    # (half,)
    args = timesteps.float()[:, None] * freqs[None, :]                                      # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)                             # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))                                                            # (B, dim)
    return emb

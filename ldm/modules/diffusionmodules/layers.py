"""Small U-Net layers: float32 GroupNorm, zero initialisation, gradient checkpointing, 2x resampling."""
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

NUM_GROUPS = 32


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (stable under fp16/bf16), cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int, eps: float = 1e-5, num_groups: int = NUM_GROUPS) -> GroupNorm32:
    """The U-Net's normalisation: GroupNorm, 32 groups as CompVis (eps 1e-5 in blocks, 1e-6 in SpatialTransformer).

    Fewer groups (UNetModel `norm_num_groups`, as diffusers names it) suit narrow networks: with 32 channels, 32
    groups normalise each channel alone, removing every feature map's mean, which a small model relearns slowly.
    """
    if channels % num_groups != 0:
        raise ValueError(f"normalization: {channels} channels are not divisible by {num_groups} groups; "
                         f"choose model_channels (times each channel_mult) as a multiple of {num_groups}")
    return GroupNorm32(num_groups, channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` to zero (residual branches start as the identity) and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def checkpoint(function: Callable[..., Any], *args: Any, enabled: bool) -> Any:
    """`function(*args)`, recomputed in the backward pass when `enabled` and autograd is recording."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
    return function(*args)


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 conv `op` (use_conv) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, kernel_size=3, stride=2, padding=1)
        elif self.out_channels != channels:
            raise ValueError(f"Downsample: average pooling cannot change channels ({channels} -> {self.out_channels})")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)                                               # (B, C_out, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W with nearest-neighbour interpolation, then a 3x3 `conv` (use_conv)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, kernel_size=3, padding=1)
        elif self.out_channels != channels:
            raise ValueError(f"Upsample: without a conv channels cannot change ({channels} -> {self.out_channels})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")           # (B, C, 2H, 2W)
        return self.conv(x) if self.use_conv else x                     # (B, C_out, 2H, 2W)

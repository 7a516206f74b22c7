"""Building blocks of the first-stage autoencoder: ResNet block, single-head attention, resampling.

Attribute names follow the CompVis checkpoint layout (REFERENCE.md §2) so published weights load strictly.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.util import ConfigError

NUM_GROUPS = 32
NORM_TYPES = ("group", "none")


def Normalize(channels: int, norm_type: str = "group") -> nn.Module:
    """GroupNorm with 32 groups and eps 1e-6, as in the CompVis autoencoder; or, with norm_type "none", the identity.

    GroupNorm removes each image's per-group mean and scale, so absolute colour levels must travel through the
    residual paths; a small net (ch 32: one channel per group) learns that slowly and spends its first thousands
    of steps on per-image colour offsets. "none" trains several dB further in the same time on CPU budgets
    (README, stage one); its models have no norm weights, so they do not load CompVis checkpoints.
    """
    if norm_type == "none":
        return nn.Identity()
    if norm_type != "group":
        raise ConfigError(f"ddconfig.norm_type={norm_type!r} is not supported; use one of {list(NORM_TYPES)}")
    if channels % NUM_GROUPS != 0:
        raise ValueError(f"Normalize: {channels} channels are not divisible by {NUM_GROUPS} groups; "
                         f"choose ddconfig.ch (times each ch_mult) as a multiple of {NUM_GROUPS}")
    return nn.GroupNorm(num_groups=NUM_GROUPS, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv3x3 -> norm -> SiLU -> dropout -> conv3x3, plus a (1x1 `nin_shortcut`) skip."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 norm_type: str = "group"):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels, norm_type)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = Normalize(out_channels, norm_type)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                      # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))        # (B, C_out, H, W)
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)                               # (B, C_out, H, W)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions with 1x1-conv q, k, v and output projection."""

    def __init__(self, in_channels: int, norm_type: str = "group"):
        super().__init__()
        self.norm = Normalize(in_channels, norm_type)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, c, h * w).transpose(2, 3)       # (B, 1, HW, C)

        q, k, v = tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn))
        out = F.scaled_dot_product_attention(q, k, v)              # (B, 1, HW, C), scale 1/sqrt(C)
        out = out.transpose(2, 3).reshape(b, c, h, w)              # (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right/bottom by one then a stride-2 3x3 `conv`, or 2x2 average pooling."""

    def __init__(self, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            x = F.pad(x, (0, 1, 0, 1))                             # (B, C, H+1, W+1), asymmetric
            return self.conv(x)                                    # (B, C, H/2, W/2)
        return F.avg_pool2d(x, kernel_size=2, stride=2)            # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour interpolation, then an optional 3x3 `conv`."""

    def __init__(self, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")     # (B, C, 2H, 2W)
        return self.conv(x) if self.with_conv else x

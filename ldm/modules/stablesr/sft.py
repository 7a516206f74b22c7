"""SFT modulation layer M: (alpha, beta) = M(F_lr), applied to a U-Net ResBlock's residual branch (StableSR).

Two forms behind one switch (`form`):
- "sft" (the paper, the seed's formula): F^ = (1 + alpha) * F + beta. With `zero_init` the last convs are zero, so
  alpha = beta = 0 and F^ = F exactly: the modulated U-Net reproduces the base model bit for bit at step 0.
- "spade" (the released code): F^ = GroupNorm(F) * (1 + gamma) + beta, the GroupNorm affine and learnable
  (`param_free_norm`, despite its name). GroupNorm(F) != F, so no initialisation makes this the identity. With
  `zero_init` what holds at step 0 is that gamma = beta = 0: F^ = GroupNorm(F) does not depend on the LR features
  (the model ignores its LR input until it learns) and the U-Net equals the base with each residual branch
  group-normalised. The released code keeps PyTorch's default init (`zero_init: false`).

Keys (StableSR checkpoint layout, `<resblock>.spade.*`): `param_free_norm.{weight,bias}` (spade form only),
`mlp_shared.0.{weight,bias}`, `mlp_gamma.{weight,bias}`, `mlp_beta.{weight,bias}`.
"""
import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.layers import NUM_GROUPS, normalization, zero_module

FORMS = ("sft", "spade")


class SFTLayer(nn.Module):
    """Conv3x3(cond -> hidden) + ReLU, then two Conv3x3(hidden -> channels) giving alpha (gamma) and beta."""

    def __init__(self, channels: int, cond_channels: int, hidden_channels: int = 128, kernel_size: int = 3,
                 form: str = "spade", zero_init: bool = True, norm_num_groups: int = NUM_GROUPS):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"SFTLayer: form must be one of {FORMS}, got {form!r}")
        if kernel_size % 2 != 1:
            raise ValueError(f"SFTLayer: kernel_size must be odd (same-size convs), got {kernel_size}")
        self.form = form
        if form == "spade":
            self.param_free_norm = normalization(channels, num_groups=norm_num_groups)   # affine, eps 1e-5, fp32
        pad = kernel_size // 2
        self.mlp_shared = nn.Sequential(nn.Conv2d(cond_channels, hidden_channels, kernel_size, padding=pad),
                                        nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden_channels, channels, kernel_size, padding=pad)
        self.mlp_beta = nn.Conv2d(hidden_channels, channels, kernel_size, padding=pad)
        if zero_init:
            zero_module(self.mlp_gamma), zero_module(self.mlp_beta)

    def forward(self, h: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """h (B, C, H, W) modulated by the LR feature map (B, cond_channels, H, W)."""
        if feature.shape[-2:] != h.shape[-2:] or feature.shape[0] != h.shape[0]:
            raise ValueError(f"SFTLayer: LR features {tuple(feature.shape)} do not match the U-Net features "
                             f"{tuple(h.shape)} in batch size and H, W")
        actv = self.mlp_shared(feature.to(h.dtype))                         # (B, hidden, H, W)
        gamma, beta = self.mlp_gamma(actv), self.mlp_beta(actv)             # (B, C, H, W) each
        if self.form == "spade":
            h = self.param_free_norm(h)                                     # (B, C, H, W)
        return h * (1 + gamma) + beta                                       # (B, C, H, W)

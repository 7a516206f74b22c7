"""Editing with any diffusion model: img2img (SDEdit: noise an image part-way, then denoise it) and inpainting
by blending (keep the known region, mask = 1, and let the sampler fill the rest), for every sampler.

strength s in (0, 1] says how far the image is noised:
  sigma samplers   from timestep s (T - 1): sigma_start = sigma(s (T - 1)), then round(s * steps) steps of the
                   chosen schedule from sigma_start down (s = 1: exactly plain sampling from init + sigma_max z);
  DDIM / PLMS      round(s * steps) steps of the `steps`-step sub-sequence, starting at its k-th timestep
                   (as CompVis' img2img script); DDPM from timestep round(s T) - 1.
Inpainting with a sigma sampler wraps the denoiser so that D = x0 in the known region: the known part of the
state then stays exactly x0 + sigma z on its noise path (every sampler here is exact for a constant D), the
unknown part sees it at each step, and the last step lands on x0. The discrete samplers re-noise the known
region at every step instead (`blend_known`). RePaint resampling is not implemented.
"""
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.diffusion.timesteps import ddim_timesteps


def check_strength(strength: float) -> float:
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1] (1: start from pure noise), got {strength}")
    return float(strength)


def strength_steps(strength: float, steps: int) -> int:
    """How many of `steps` an img2img run at `strength` takes (at least one)."""
    return max(1, round(check_strength(strength) * steps))


def discrete_start_t(sampler: str, strength: float, steps: int, num_timesteps: int,
                     discretize: str = "uniform") -> int:
    """The integer timestep an img2img run of a discrete sampler starts at."""
    if sampler == "ddpm":
        return max(1, round(check_strength(strength) * num_timesteps)) - 1
    timesteps = ddim_timesteps(num_timesteps, steps, discretize)                  # ascending
    return int(timesteps[min(strength_steps(strength, steps), len(timesteps)) - 1])


class KnownRegionDenoiser:
    """D(x, sigma) with the known region (mask = 1) replaced by x0: inpainting for the sigma samplers."""

    def __init__(self, denoiser: Callable[..., Tensor], mask: Tensor, x0: Tensor):
        self.denoiser, self.mask, self.x0 = denoiser, mask, x0

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        mask = self.mask.to(x)
        return mask * self.x0.to(x) + (1 - mask) * self.denoiser(x, sigma, **cond)


def known_mask_at(mask: Tensor, size: tuple) -> Tensor:
    """A known-region mask (1 = known, (B, 1, H, W)) at a smaller size (h, w): known only where every pixel it
    covers is known (min-pooling), so that no unknown pixel is pinned to the image."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return 1 - F.adaptive_max_pool2d(1 - mask.float(), tuple(size)).to(mask.dtype)


def blend(x: Tensor, mask: Optional[Tensor], x0: Optional[Tensor]) -> Tensor:
    """x with the known region (mask = 1) set to x0; x when there is no mask."""
    if mask is None:
        return x
    mask = mask.to(x)
    return mask * x0.to(x) + (1 - mask) * x

"""Stateless samplers over a denoiser callable `model(x, t, **cond)` (integer timesteps t)."""
from ldm.diffusion.samplers.ddim import ddim_step, sample_ddim
from ldm.diffusion.samplers.ddpm import sample_ddpm
from ldm.diffusion.samplers.plms import sample_plms

__all__ = ["sample_ddpm", "sample_ddim", "sample_plms", "ddim_step"]

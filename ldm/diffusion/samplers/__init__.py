"""Stateless samplers: the discrete ones over `model(x, t, **cond)` (integer timesteps), the sigma ones over a
denoiser `D(x, sigma, **cond)` (ldm.diffusion.denoiser) with descending `sigmas`."""
from ldm.diffusion.samplers.ddim import ddim_step, sample_ddim
from ldm.diffusion.samplers.ddpm import sample_ddpm
from ldm.diffusion.samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_2s_ancestral
from ldm.diffusion.samplers.euler import sample_euler, sample_euler_ancestral, sample_heun
from ldm.diffusion.samplers.plms import sample_plms
from ldm.diffusion.samplers.unipc import sample_unipc

__all__ = ["sample_ddpm", "sample_ddim", "sample_plms", "ddim_step", "sample_euler", "sample_euler_ancestral",
           "sample_heun", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_2s_ancestral", "sample_unipc"]

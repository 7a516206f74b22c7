"""ldm: a latent diffusion framework (DDPM, KL/VQ autoencoders, latent diffusion, StableSR)."""

__version__ = "0.1.0"

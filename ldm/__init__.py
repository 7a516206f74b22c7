"""ldm: a latent diffusion framework (DDPM, KL/VQ autoencoders, latent diffusion, StableSR)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load_model":  # lazy: `import ldm` stays light
        from ldm.loading import load_model
        return load_model
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")

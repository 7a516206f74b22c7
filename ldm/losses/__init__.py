"""Autoencoder (first-stage) losses: LPIPS, PatchGAN discriminator, KL/VQ perceptual-adversarial losses."""
from ldm.losses.autoencoder_loss import AutoencoderGANLoss, LPIPSWithDiscriminator, VQLPIPSWithDiscriminator
from ldm.losses.discriminator import ActNorm, NLayerDiscriminator, weights_init
from ldm.losses.gan import adaptive_weight, adopt_weight, hinge_d_loss, vanilla_d_loss
from ldm.losses.lpips import build_lpips

__all__ = ["AutoencoderGANLoss", "LPIPSWithDiscriminator", "VQLPIPSWithDiscriminator", "ActNorm",
           "NLayerDiscriminator", "weights_init", "adaptive_weight", "adopt_weight", "hinge_d_loss",
           "vanilla_d_loss", "build_lpips"]

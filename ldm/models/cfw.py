"""CFWAutoencoder: StableSR's second stage (`AutoencoderKLResi`), a KL autoencoder whose decoder fuses the
encoder features of the upsampled LR image (controllable feature wrapping, ldm/modules/autoencoder/cfw.py).

Training (StableSR): pairs of (latent z of the SR model's output for an LR image, the HR ground truth, the LR
image bicubic-upsampled to HR size). The LR goes through the frozen encoder for its features; z through
post_quant_conv and the fusing decoder at w = fusion_w (1.0); L1 + LPIPS + PatchGAN against the HR image.
With freeze_dec only the fusion layers (and the discriminator) train. Batch keys (our conventions, images in
[-1, 1]): `gt` (3, H, W), `lq` (3, H, W), `latent` (C, H/f, W/f) scaled by latent_scale as the SR model samples it.

Sampling:
    posterior, feats = cfw.encode_with_features(lr_up)     # lr_up: LR upsampled to the output size, [-1, 1]
    z_lr = posterior.sample() * scale_factor               # the SR model's LR latent, from the same pass
    ... z = sampled latent ...
    image = cfw.decode(z / scale_factor, feats, w=0.5)     # w = 0: the plain decoder
"""
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
from pytorch_lightning.utilities import rank_zero_info

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.autoencoder.cfw import FusionDecoder
from ldm.modules.distributions import DiagonalGaussianDistribution

# StableSR's config names its modified loss `LPIPSWithDiscriminator`; inside a CFW model that name means CFWLoss.
_STABLESR_LOSS_NAMES = ("ldm.modules.losses.LPIPSWithDiscriminator",
                        "ldm.modules.losses.contperceptual.LPIPSWithDiscriminator",
                        "ldm.losses.autoencoder_loss.LPIPSWithDiscriminator")
CFW_LOSS = "ldm.losses.cfw_loss.CFWLoss"


def _cfw_lossconfig(lossconfig: Mapping) -> Mapping:
    if isinstance(lossconfig, Mapping) and lossconfig.get("target") in _STABLESR_LOSS_NAMES:
        rank_zero_info(f"CFWAutoencoder: lossconfig target {lossconfig['target']} is StableSR's CFW loss here: "
                       f"using {CFW_LOSS} (fixed GAN weight disc_weight, mean reconstruction loss)")
        return {**dict(lossconfig), "target": CFW_LOSS}
    return lossconfig


class CFWAutoencoder(AutoencoderKL):
    """AutoencoderKL + FusionDecoder (module docstring); key layout of StableSR's `AutoencoderKLResi`."""

    def __init__(self, ddconfig: Mapping, lossconfig: Mapping, embed_dim: int,
                 fusion_w: float = 1.0,                  # w used in training and as decode()'s default
                 num_fuse_block: int = 2,                # RRDBs per fusion layer
                 freeze_dec: bool = True,                # train only the fusion layers (and the discriminator)
                 ckpt_path: str | None = None, ignore_keys: Sequence[str] = (),
                 image_key: str = "gt", lq_key: str = "lq", latent_key: str = "latent",
                 latent_scale: float = 0.18215,          # batch latents are divided by it (StableSR's scale_factor)
                 monitor: str | None = None, colorize_nlabels: int | None = None, grad_clip: float | None = None,
                 lr_warmup_steps: int = 0, scheduler_config: Mapping | None = None):
        ddconfig = dict(ddconfig)
        num_fuse_block = ddconfig.pop("num_fuse_block", num_fuse_block)   # StableSR also reads them from ddconfig
        fusion_w = ddconfig.pop("fusion_w", fusion_w)
        super().__init__(ddconfig, _cfw_lossconfig(lossconfig), embed_dim, image_key=image_key, monitor=monitor,
                         colorize_nlabels=colorize_nlabels, grad_clip=grad_clip, lr_warmup_steps=lr_warmup_steps,
                         scheduler_config=scheduler_config)
        self.decoder = FusionDecoder(**ddconfig, num_fuse_block=num_fuse_block, fusion_w=fusion_w)
        self.lq_key, self.latent_key, self.latent_scale = lq_key, latent_key, latent_scale
        self.freeze_dec = freeze_dec
        if freeze_dec:
            for name, param in self.named_parameters():
                param.requires_grad_("fusion_layer" in name or name.startswith("loss.discriminator."))
        self._finish_init(ckpt_path, ignore_keys)

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = ()) -> None:
        """As AutoencoderKL (strict); a file without fusion layers (an SD VAE or SD checkpoint, where CFW training
        starts) leaves them at their initialisation."""
        from ldm.checkpoint import read_state_dict

        if not any("fusion_layer" in k for k in read_state_dict(path)):
            ignore_keys = tuple(ignore_keys) + ("decoder.fusion_layer_",)
        super().init_from_ckpt(path, ignore_keys)

    @property
    def fusion_w(self) -> float:
        return self.decoder.fusion_w

    @fusion_w.setter
    def fusion_w(self, w: float) -> None:
        self.decoder.fusion_w = w

    def generator_parameters(self) -> list[nn.Parameter]:
        if not self.freeze_dec:
            return super().generator_parameters()
        return [p for n, p in self.decoder.named_parameters() if n.startswith("fusion_layer")]

    # ---- encode / decode --------------------------------------------------------------------------------------
    def encode_with_features(self, x: torch.Tensor) -> tuple[DiagonalGaussianDistribution, list[torch.Tensor]]:
        """The posterior of x and the encoder's per-level features (level L: (B, ch*ch_mult[L], H/2^L, W/2^L))."""
        h, features = self.encoder(x, return_features=True)
        return DiagonalGaussianDistribution(self.quant_conv(h)), features

    def decode(self, z: torch.Tensor, enc_features: Sequence[torch.Tensor] | None = None,
               w: float | None = None) -> torch.Tensor:
        """z (B, embed_dim, h, w) unscaled -> image; fused with `enc_features` at weight w (default fusion_w)."""
        return self.decoder(self.post_quant_conv(z), enc_features, w)

    def forward(self, lq: torch.Tensor, latent: torch.Tensor | None = None, w: float | None = None,
                sample_posterior: bool = True):
        """(image, posterior of lq): `latent` (unscaled) decoded with lq's features; without `latent`, lq's own
        latent (sampled or the mode)."""
        posterior, features = self.encode_with_features(lq)
        if latent is None:
            latent = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(latent, features, w), posterior

    def _reconstruct(self, x):
        xrec, posterior = self(x, sample_posterior=self.training)
        return xrec, posterior.kl().mean(), {}

    # ---- training data ----------------------------------------------------------------------------------------
    def _batch_tensor(self, batch: Mapping[str, Any], key: str, what: str) -> torch.Tensor:
        if key not in batch:
            raise KeyError(f"CFWAutoencoder: batch has no key {key!r} ({what}); keys: {sorted(batch)}")
        return batch[key].to(memory_format=torch.contiguous_format).float()

    def cfw_inputs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gt, lq, unscaled latent) of a batch, shapes checked against each other."""
        gt = self.get_input(batch)                                          # (B, 3, H, W)
        lq = self._batch_tensor(batch, self.lq_key, "the LR image upsampled to HR size")
        latent = self._batch_tensor(batch, self.latent_key, "the SR model's latent") / self.latent_scale
        f = self.encoder.downsampling_factor
        if lq.shape != gt.shape or latent.shape[-2:] != (gt.shape[-2] // f, gt.shape[-1] // f):
            raise ValueError(f"CFWAutoencoder: need {self.lq_key} of the {self.image_key} shape {tuple(gt.shape)} and "
                             f"{self.latent_key} of spatial size 1/{f} of it; got {tuple(lq.shape)}, "
                             f"{tuple(latent.shape)}")
        return gt, lq, latent

    def reconstruction_pair(self, batch: Mapping[str, Any]):
        gt, lq, latent = self.cfw_inputs(batch)
        xrec, posterior = self(lq, latent)
        return gt, xrec, posterior.kl().mean(), {}

    @torch.no_grad()
    def log_images(self, batch, N: int = 4, **kwargs) -> dict[str, torch.Tensor]:
        """`inputs` (upsampled LR), `gts`, `reconstructions` (fused at fusion_w) and `plain_decode` (w = 0)."""
        was_training = self.training
        self.eval()
        try:
            gt, lq, latent = (t[:N] for t in self.cfw_inputs(batch))
            posterior, features = self.encode_with_features(lq)
            images = {"inputs": lq, "gts": gt, "reconstructions": self.decode(latent, features),
                      "plain_decode": self.decode(latent, features, w=0.0)}
        finally:
            self.train(was_training)
        return {k: v.clamp(-1.0, 1.0) for k, v in images.items()}

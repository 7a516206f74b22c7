"""First-stage (KL / VQ autoencoder) losses: pixel + LPIPS reconstruction, regulariser, PatchGAN.

Interface used by the Lightning autoencoders (manual optimisation, two optimizers):
    g_loss, log = loss.generator_loss(x, x_hat, reg_loss, global_step, last_layer=W, split="train")
    d_loss, log = loss.discriminator_loss(x, x_hat.detach(), global_step, split="train")
    loss.disc_active(global_step); loss.autoencoder_parameters(); loss.discriminator
Parameter names follow the CompVis / taming configs so their YAMLs instantiate unchanged.
"""
from typing import Iterator

import torch
import torch.nn as nn

from ldm.losses.discriminator import NLayerDiscriminator, weights_init
from ldm.losses.gan import D_LOSSES, adaptive_weight, adopt_weight
from ldm.losses.lpips import build_lpips
from ldm.util import ConfigError

PIXEL_LOSSES = ("l1", "l2")


class AutoencoderGANLoss(nn.Module):
    """Shared machinery; subclasses define the nll reduction (`_nll`) and the regulariser's log name.

    rec = pixelloss_weight * |x - x_hat| (or squared) + perceptual_weight * LPIPS(x, x_hat), per pixel;
    total = nll(rec) + reg_weight * reg_loss + d_weight * disc_factor * (-mean D(x_hat)).
    The GAN terms are off (D not run) while global_step < disc_start or disc_factor == 0.
    """

    reg_name = "reg_loss"  # log key of the regulariser

    def __init__(self, disc_start: int, reg_weight: float, pixelloss_weight: float, disc_num_layers: int,
                 disc_in_channels: int, disc_factor: float, disc_weight: float, perceptual_weight: float,
                 use_actnorm: bool, disc_conditional: bool, disc_loss: str, pixel_loss: str, disc_ndf: int,
                 lpips_pretrained_backbone: bool):
        super().__init__()
        name = type(self).__name__
        if disc_loss not in D_LOSSES:
            raise ConfigError(f"{name}: disc_loss must be one of {sorted(D_LOSSES)}, got {disc_loss!r}")
        if pixel_loss not in PIXEL_LOSSES:
            raise ConfigError(f"{name}: pixel_loss must be one of {list(PIXEL_LOSSES)}, got {pixel_loss!r}")
        if disc_conditional:
            raise ConfigError(f"{name}: disc_conditional=True is not supported (the loss interface passes no "
                              f"conditioning to the discriminator); set disc_conditional: false")
        self.disc_start = disc_start
        self.reg_weight = reg_weight
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        self.disc_factor = disc_factor
        self.disc_weight = disc_weight
        self.pixel_loss = pixel_loss
        self.disc_loss_fn = D_LOSSES[disc_loss]
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels, ndf=disc_ndf,
                                                 n_layers=disc_num_layers, use_actnorm=use_actnorm)
        self.discriminator.apply(weights_init)
        self.perceptual_loss = build_lpips(lpips_pretrained_backbone) if perceptual_weight > 0 else None

    def train(self, mode: bool = True) -> "AutoencoderGANLoss":
        """Switch mode; LPIPS stays in eval (it is frozen: no dropout, deterministic)."""
        super().train(mode)
        if self.perceptual_loss is not None:
            self.perceptual_loss.eval()
        return self

    def disc_active(self, global_step: int) -> bool:
        """Whether the GAN terms (and the discriminator update) are on at this step."""
        return adopt_weight(self.disc_factor, global_step, self.disc_start) > 0

    def autoencoder_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters of this loss that belong to the generator optimizer (e.g. logvar)."""
        for name, param in self.named_parameters():
            if not name.startswith(("discriminator.", "perceptual_loss.")) and param.requires_grad:
                yield param

    def _nll(self, rec_loss: torch.Tensor) -> torch.Tensor:
        """Reduce the per-pixel reconstruction loss (B, C, H, W) to the scalar nll."""
        raise NotImplementedError

    def _extra_log(self) -> dict[str, torch.Tensor]:
        return {}

    def _reconstruction(self, inputs: torch.Tensor,
                        reconstructions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel rec loss (B, C, H, W) and the LPIPS distance (B, 1, 1, 1) (zeros when disabled)."""
        diff = inputs.contiguous() - reconstructions.contiguous()          # (B, C, H, W)
        rec_loss = self.pixel_weight * (diff.abs() if self.pixel_loss == "l1" else diff.pow(2))
        if self.perceptual_loss is None:
            return rec_loss, inputs.new_zeros(inputs.shape[0], 1, 1, 1)
        if inputs.shape[1] != 3:
            raise ValueError(f"{type(self).__name__}: LPIPS needs 3-channel images, got {inputs.shape[1]} "
                             f"channels; set perceptual_weight: 0 for other inputs")
        p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())  # (B, 1, 1, 1)
        return rec_loss + self.perceptual_weight * p_loss, p_loss

    def _gan_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer) -> torch.Tensor:
        """Adaptive weight in training with autograd on; 0 otherwise (eval: total = nll + reg, as CompVis)."""
        if not (self.training and torch.is_grad_enabled()):
            return g_loss.new_zeros(())
        if last_layer is None:
            raise ValueError(f"{type(self).__name__}.generator_loss: last_layer (the decoder's last conv "
                             f"weight) is required in training once the discriminator is active")
        return adaptive_weight(nll_loss, g_loss, last_layer, self.disc_weight)

    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, reg_loss: torch.Tensor,
                       global_step: int, last_layer: torch.Tensor | None = None, split: str = "train"):
        """Autoencoder objective and its log; inputs/reconstructions (B, C, H, W) in [-1, 1]."""
        _check_pair(type(self).__name__, inputs, reconstructions)
        rec_loss, p_loss = self._reconstruction(inputs, reconstructions)  # (B, C, H, W), (B, 1, 1, 1)
        nll_loss = self._nll(rec_loss)
        reg_loss = reg_loss.mean()
        disc_factor = adopt_weight(self.disc_factor, global_step, self.disc_start)
        if disc_factor > 0:
            logits_fake = self.discriminator(reconstructions.contiguous())   # (B, 1, h, w)
            g_loss = -logits_fake.mean()
            d_weight = self._gan_weight(nll_loss, g_loss, last_layer)
        else:
            g_loss = d_weight = nll_loss.new_zeros(())
        total = nll_loss + self.reg_weight * reg_loss + d_weight * disc_factor * g_loss
        log = {"total_loss": total, "rec_loss": rec_loss.mean(), "nll_loss": nll_loss, "p_loss": p_loss.mean(),
               self.reg_name: reg_loss, "d_weight": d_weight, "disc_factor": nll_loss.new_tensor(float(disc_factor)),
               "g_loss": g_loss, **self._extra_log()}
        return total, _flat_log(log, split)

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int,
                           split: str = "train"):
        """PatchGAN loss on real inputs vs (detached) reconstructions, gated like the generator's GAN term.

        While inactive D is not run and the loss is a zero that backward() accepts (no gradient anywhere).
        """
        _check_pair(type(self).__name__, inputs, reconstructions)
        disc_factor = adopt_weight(self.disc_factor, global_step, self.disc_start)
        if disc_factor > 0:
            logits_real = self.discriminator(inputs.contiguous().detach())          # (B, 1, h, w)
            logits_fake = self.discriminator(reconstructions.contiguous().detach())  # (B, 1, h, w)
            d_loss = disc_factor * self.disc_loss_fn(logits_real, logits_fake)
            logits_real, logits_fake = logits_real.mean(), logits_fake.mean()
        else:
            d_loss = inputs.new_zeros((), requires_grad=True)
            logits_real = logits_fake = inputs.new_zeros(())
        log = {"disc_loss": d_loss, "logits_real": logits_real, "logits_fake": logits_fake}
        return d_loss, _flat_log(log, split)


class LPIPSWithDiscriminator(AutoencoderGANLoss):
    """KL-autoencoder loss: nll = rec / exp(logvar) + logvar summed per image, averaged over the batch.

    total = nll + kl_weight * KL + GAN term. `logvar` (learned, shape ()) is returned by
    autoencoder_parameters() so the generator optimizer trains it (CompVis never did).
    `pixelloss_weight` scales the pixel term (CompVis accepted and ignored it; default 1 is identical).
    """

    reg_name = "kl_loss"

    def __init__(self, disc_start: int, logvar_init: float = 0.0, kl_weight: float = 1.0,
                 pixelloss_weight: float = 1.0, disc_num_layers: int = 3, disc_in_channels: int = 3,
                 disc_factor: float = 1.0, disc_weight: float = 1.0, perceptual_weight: float = 1.0,
                 use_actnorm: bool = False, disc_conditional: bool = False, disc_loss: str = "hinge",
                 pixel_loss: str = "l1", disc_ndf: int = 64, lpips_pretrained_backbone: bool = True):
        super().__init__(disc_start, kl_weight, pixelloss_weight, disc_num_layers, disc_in_channels, disc_factor,
                         disc_weight, perceptual_weight, use_actnorm, disc_conditional, disc_loss, pixel_loss,
                         disc_ndf, lpips_pretrained_backbone)
        self.kl_weight = kl_weight
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)))

    def _nll(self, rec_loss: torch.Tensor) -> torch.Tensor:
        nll = rec_loss / torch.exp(self.logvar) + self.logvar  # (B, C, H, W)
        return nll.sum() / nll.shape[0]

    def _extra_log(self) -> dict[str, torch.Tensor]:
        return {"logvar": self.logvar}


class VQLPIPSWithDiscriminator(AutoencoderGANLoss):
    """VQ-autoencoder loss: nll = mean(rec); total = nll + codebook_weight * quant_loss + GAN term.

    No logvar (as taming / CompVis: `loss.*` keys match their VQ checkpoints). `n_classes` is accepted
    for config compatibility only: CompVis used it for codebook-usage logging from predicted indices,
    which this interface does not receive; it does not change the loss.
    """

    reg_name = "quant_loss"

    def __init__(self, disc_start: int, codebook_weight: float = 1.0, pixelloss_weight: float = 1.0,
                 disc_num_layers: int = 3, disc_in_channels: int = 3, disc_factor: float = 1.0,
                 disc_weight: float = 1.0, perceptual_weight: float = 1.0, use_actnorm: bool = False,
                 disc_conditional: bool = False, disc_ndf: int = 64, disc_loss: str = "hinge",
                 n_classes: int | None = None, perceptual_loss: str = "lpips", pixel_loss: str = "l1",
                 lpips_pretrained_backbone: bool = True):
        if perceptual_loss != "lpips":
            raise ConfigError(f"VQLPIPSWithDiscriminator: perceptual_loss must be 'lpips', got {perceptual_loss!r}")
        super().__init__(disc_start, codebook_weight, pixelloss_weight, disc_num_layers, disc_in_channels,
                         disc_factor, disc_weight, perceptual_weight, use_actnorm, disc_conditional, disc_loss,
                         pixel_loss, disc_ndf, lpips_pretrained_backbone)
        self.codebook_weight = codebook_weight
        self.n_classes = n_classes

    def _nll(self, rec_loss: torch.Tensor) -> torch.Tensor:
        return rec_loss.mean()


def _check_pair(where: str, inputs: torch.Tensor, reconstructions: torch.Tensor) -> None:
    if inputs.shape != reconstructions.shape or inputs.dim() != 4:
        raise ValueError(f"{where}: inputs and reconstructions must both be (B, C, H, W) of the same shape, "
                         f"got {tuple(inputs.shape)} and {tuple(reconstructions.shape)}")


def _flat_log(log: dict[str, torch.Tensor], split: str) -> dict[str, torch.Tensor]:
    return {f"{split}/{key}": value.detach() for key, value in log.items()}

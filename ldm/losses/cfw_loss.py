"""The loss StableSR trains its CFW decoder fusion with (its modified `LPIPSWithDiscriminator`).

Same terms as the KL autoencoder loss (L1 + LPIPS reconstruction, KL, hinge PatchGAN), two differences:
    nll   the MEAN over pixels of rec / exp(logvar) + logvar (not the per-image sum), logvar fixed at logvar_init
    GAN   weight fixed to disc_weight (StableSR: 0.025). The adaptive weight needs gradients at the decoder's last
          layer, which is frozen in CFW training; StableSR's code falls back to disc_weight, which is what we use.
StableSR further divides the mean by the batch size; with its batch of 1 that changes nothing and is left out.
"""
import torch

from ldm.losses.autoencoder_loss import LPIPSWithDiscriminator


class CFWLoss(LPIPSWithDiscriminator):
    """L1 + LPIPS (mean) + kl_weight * KL + disc_weight * hinge GAN after disc_start (module docstring)."""

    def __init__(self, disc_start: int = 501, kl_weight: float = 0.0, disc_weight: float = 0.025, **kwargs):
        super().__init__(disc_start, kl_weight=kl_weight, disc_weight=disc_weight, **kwargs)
        self.logvar.requires_grad_(False)                     # StableSR never trains it in CFW

    def _nll(self, rec_loss: torch.Tensor) -> torch.Tensor:
        return (rec_loss / torch.exp(self.logvar) + self.logvar).mean()

    def _gan_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return g_loss.new_zeros(())
        return g_loss.new_tensor(float(self.disc_weight))

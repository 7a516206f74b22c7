"""The base U-Net with one SFT layer per ResBlock (StableSR's `UNetModelDualcondV2`).

Every ResBlock of the U-Net (input, middle and output blocks: 22 in SD 2.x) owns `spade`, an `SFTLayer`, so the
keys are the base model's plus `<resblock>.spade.*` (StableSR checkpoint layout). A forward pass takes the time-aware
encoder's feature pyramid `struct_cond` ({str(width): (B, semb_channels, H_i, W_i)}); each ResBlock modulates its
residual branch with the map whose width equals its own (`str(h.shape[-1])`, as the released code picks it; no
resizing, so the latent's size must give matching pyramids). Without `struct_cond` it is the plain base U-Net.
"""
import functools
from typing import Mapping

import torch

from ldm.modules.diffusionmodules.resblock import ResBlock
from ldm.modules.diffusionmodules.unet import UNetModel
from ldm.modules.stablesr.sft import SFTLayer
from ldm.util import with_base_signature

SFT_KEY = "spade"  # attribute / key component of the SFT layers (trainable-parameter rule: names containing it)


def _modulate(layer: SFTLayer, struct_cond: Mapping[str, torch.Tensor], block: str, h: torch.Tensor) -> torch.Tensor:
    """The SFT of ResBlock `block` on its residual output h (B, C, H, W), fed the pyramid level of width W."""
    key = str(h.shape[-1])
    if key not in struct_cond:
        raise KeyError(f"SFTUNetModel: ResBlock {block} works at width {key} but the encoder features have widths "
                       f"{sorted(struct_cond, key=int)}; the LR latent and x_t must have the same H, W")
    return layer(h, struct_cond[key])                                       # (B, C, H, W)


@with_base_signature
class SFTUNetModel(UNetModel):
    """UNetModel + an SFT layer (`spade`) in every ResBlock. Params: those of UNetModel, and

    semb_channels: channels of the encoder features (StableSR: 256); sft_form: "spade" (released code) or "sft"
    (the paper's (1 + alpha) F + beta); sft_hidden_channels: width of the shared conv (128); sft_zero_init: zero
    the alpha/beta convs so the modulation starts at zero (exact identity for "sft"; see ldm.modules.stablesr.sft).
    """

    def __init__(self, *, semb_channels: int = 256, sft_form: str = "spade", sft_hidden_channels: int = 128,
                 sft_zero_init: bool = True, **unet_params):
        super().__init__(**unet_params)
        self.semb_channels, self.sft_form, self.sft_zero_init = semb_channels, sft_form, sft_zero_init
        for name in self.resblock_names:
            block: ResBlock = self.get_submodule(name)
            block.spade = SFTLayer(block.out_channels, semb_channels, sft_hidden_channels, form=sft_form,
                                   zero_init=sft_zero_init, norm_num_groups=self.norm_num_groups)

    def sft_parameters(self) -> list[torch.nn.Parameter]:
        """The modulation layers' parameters (what StableSR trains in the U-Net)."""
        return [p for name, p in self.named_parameters() if f".{SFT_KEY}." in name]

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context=None, y: torch.Tensor | None = None,
                struct_cond: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """As UNetModel.forward; struct_cond: the encoder's {str(width): (B, semb_channels, H_i, W_i)} (None: no
        modulation, the base U-Net)."""
        modulations = None
        if struct_cond is not None:
            modulations = {name: functools.partial(_modulate, self.get_submodule(name).spade, struct_cond, name)
                           for name in self.resblock_names}
        return super().forward(x, timesteps, context, y, modulations)

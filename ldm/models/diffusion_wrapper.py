"""DiffusionWrapper: routes the conditioning of a `conditioning_key` into the U-Net (`model.diffusion_model.*`)."""
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from ldm.util import ConfigError, instantiate_from_config

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm")

# Which keyword conditions each conditioning_key needs.
REQUIRED = {None: (), "concat": ("c_concat",), "crossattn": ("c_crossattn",),
            "hybrid": ("c_concat", "c_crossattn"), "adm": ("c_adm",)}

Condition = torch.Tensor | Sequence[torch.Tensor] | None


def check_conditioning_key(conditioning_key: str | None) -> str | None:
    if conditioning_key not in CONDITIONING_KEYS:
        raise ConfigError(f"model.params.conditioning_key={conditioning_key!r} is not supported; "
                          f"choose one of {CONDITIONING_KEYS}")
    return conditioning_key


def _joined(c: Condition, dim: int) -> torch.Tensor | None:
    """A tensor, or a list of tensors (CompVis passes lists) concatenated along `dim`."""
    if c is None or isinstance(c, torch.Tensor):
        return c
    return torch.cat(list(c), dim=dim)


class DiffusionWrapper(nn.Module):
    """U-Net plus the rule of where each condition goes (the denoiser `model(x, t, **cond)` of the samplers).

    concat: c_concat (B, C_c, H, W) is stacked onto x_t along channels; crossattn: c_crossattn (B, L, D) is the
    cross-attention context; hybrid: both; adm: c_adm is the U-Net's `y` (class labels (B,), or vectors (B, D);
    a ClassEmbedder's (B, 1, D) token is squeezed to (B, D)).
    """

    def __init__(self, diff_model_config: Mapping, conditioning_key: str | None = None):
        super().__init__()
        self.conditioning_key = check_conditioning_key(conditioning_key)
        self.diffusion_model = instantiate_from_config(diff_model_config, where="model.params.unet_config")

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: Condition = None, c_crossattn: Condition = None,
                c_adm: torch.Tensor | None = None,
                struct_cond: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) -> raw model output (B, C_out, H, W).

        struct_cond: StableSR's encoder features for an SFT U-Net (ldm.modules.stablesr), passed through as given."""
        given = {"c_concat": c_concat, "c_crossattn": c_crossattn, "c_adm": c_adm}
        self._check(given)
        c_concat, c_crossattn = _joined(c_concat, dim=1), _joined(c_crossattn, dim=1)
        if c_concat is not None:
            x = torch.cat([x, c_concat.to(x.dtype)], dim=1)                  # (B, C + C_c, H, W)
        y = c_adm
        if y is not None and y.ndim == 3 and y.shape[1] == 1:
            y = y[:, 0]                                                      # (B, D)
        if struct_cond is not None:
            return self.diffusion_model(x, t, context=c_crossattn, y=y, struct_cond=struct_cond)
        return self.diffusion_model(x, t, context=c_crossattn, y=y)

    def _check(self, given: Mapping[str, Condition]) -> None:
        needed = REQUIRED[self.conditioning_key]
        missing = [k for k in needed if given[k] is None]
        extra = [k for k, v in given.items() if v is not None and k not in needed]
        if missing or extra:
            raise ValueError(f"DiffusionWrapper(conditioning_key={self.conditioning_key!r}) needs the condition(s) "
                             f"{list(needed)}; missing {missing}, unexpected {extra}")

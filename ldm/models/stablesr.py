"""StableSR (Wang et al. 2023): super-resolution by a frozen latent diffusion model steered through SFT.

A thin layer over LatentDiffusion. The base U-Net (an `SFTUNetModel`: the base model's keys plus one `spade` SFT
layer per ResBlock), the first stage and the text encoder (empty prompt) are frozen; the time-aware encoder
(`structcond_stage_model`) and the SFT layers train. The condition dict gains `c_lr`, the clean latent of the LR
image bicubic-upsampled to the output size (a posterior sample, times scale_factor); the denoiser runs the encoder
on (c_lr, t) at every call, so features follow each sampling step. Sampling starts, as the released tile / demo
scripts do, from the LR latent noised to the first timestep (`sample_start: lr`; `noise`: pure noise as the
released `_old.py`), with any sampler of the framework.

Checkpoints: a full StableSR file loads strictly; a base LDM file (SD 2.1, or a tiny base trained here) loads with
the SFT and encoder keys left at their initialisation, its EMA weights (model_ema.*, if any) becoming the frozen U-Net.
"""
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info

from ldm.checkpoint import read_state_dict
from ldm.diffusion import q_sample
from ldm.diffusion.sampling import SIGMA_SAMPLERS
from ldm.diffusion.samplers.common import randn_like
from ldm.loading import select_ema
from ldm.models.ddpm import Condition
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.modules.ema import LitEma
from ldm.modules.stablesr import SFT_KEY, SFTUNetModel
from ldm.util import ConfigError, instantiate_from_config, with_base_signature

SAMPLE_STARTS = ("lr", "noise")
ENCODER = "structcond_stage_model."


@with_base_signature
class StableSR(LatentDiffusion):
    """LatentDiffusion params, plus: structcond_stage_config (the time-aware encoder, e.g.
    ldm.modules.stablesr.TimeAwareEncoder), lr_key (batch key of the LR image, any size: it is bicubic-upsampled
    to the HR size), sr_scale (sampling: the LR image is upsampled by this factor), sample_start ("lr" or "noise")."""

    def __init__(self, *, structcond_stage_config: Mapping, lr_key: str = "lr_image", sr_scale: float = 4,
                 sample_start: str = "lr", **params):
        if sample_start not in SAMPLE_STARTS:
            raise ConfigError(f"model.params.sample_start={sample_start!r}: choose one of {SAMPLE_STARTS}")
        if params.get("cond_stage_trainable"):
            raise ConfigError("model.params.cond_stage_trainable=true: StableSR trains only the time-aware encoder "
                              "and the SFT layers; the text encoder stays frozen")
        ckpt_path, ignore_keys = params.pop("ckpt_path", None), params.pop("ignore_keys", ())
        if ckpt_path in ("", "???"):
            raise ConfigError("model.params.ckpt_path is not set: point it at the base LDM's checkpoint (e.g. "
                              "model.params.ckpt_path=logs/<ldm_photos_base_tiny run>/checkpoints/last.ckpt, or SD "
                              "2.1's v2-1_512-ema-pruned.ckpt) or at a StableSR checkpoint")
        if params.pop("load_only_unet", False):
            raise ConfigError("model.params.load_only_unet is not supported by StableSR; use ckpt_path")
        use_ema = params.pop("use_ema", True)
        params["allow_random_first_stage"] = params.get("allow_random_first_stage", False) or bool(ckpt_path)
        super().__init__(use_ema=False, **params)        # the EMA is built below, over the trainable parts
        unet = self.model.diffusion_model
        if not isinstance(unet, SFTUNetModel):
            raise ConfigError(f"model.params.unet_config builds {type(unet).__name__}; StableSR needs an SFT U-Net "
                              "(target ldm.modules.stablesr.SFTUNetModel)")
        self.structcond_stage_model = instantiate_from_config(structcond_stage_config,
                                                              where="model.params.structcond_stage_config")
        if getattr(self.structcond_stage_model, "out_channels", unet.semb_channels) != unet.semb_channels:
            raise ConfigError(f"model.params.structcond_stage_config.params.out_channels="
                              f"{self.structcond_stage_model.out_channels} must equal the U-Net's semb_channels "
                              f"({unet.semb_channels})")
        self.lr_key, self.sr_scale, self.sample_start = lr_key, sr_scale, sample_start
        for name, p in self.model.named_parameters():       # the base U-Net is frozen, its SFT layers train
            p.requires_grad_(f".{SFT_KEY}." in name)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self._ema_targets(), decay=self.ema_decay)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    # ---- parameters ---------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What AdamW updates: the SFT layers and the time-aware encoder (and a learned log-variance)."""
        return (self.model.diffusion_model.sft_parameters() + list(self.structcond_stage_model.parameters())
                + ([self.logvar] if self.learn_logvar else []))

    def _ema_targets(self) -> nn.Module:
        """The EMA tracks the trainable parameters of the U-Net (its SFT layers) and of the encoder."""
        return nn.ModuleDict({"model": self.model, "structcond_stage_model": self.structcond_stage_model})

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False) -> None:
        """A full StableSR checkpoint strictly; or a base LDM checkpoint (no SFT / encoder keys: those keep their
        initialisation; the base's EMA weights, when it has them, become the frozen U-Net)."""
        ignore = tuple(ignore_keys)
        sd = {k: v for k, v in read_state_dict(path).items() if not (ignore and k.startswith(ignore))}
        trained = [k for k in self.state_dict() if k.startswith(ENCODER) or f".{SFT_KEY}." in k]
        base = not any(k in sd for k in trained)
        notes: list[str] = []
        if base:
            expected = {k: tuple(v.shape) for k, v in self.state_dict().items()
                        if not k.startswith("model_ema.") and k not in trained}
            sd = select_ema(sd, expected, use_ema=True, notes=notes)
        if base or not self.use_ema:
            sd = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
        result = self.load_state_dict(sd, strict=False)
        allowed = set(trained) if base else set()
        missing = [k for k in result.missing_keys if k not in allowed and not k.startswith("model_ema.")
                   and not (ignore and k.startswith(ignore))]
        if missing or result.unexpected_keys:
            kind = "base LDM" if base else "StableSR"
            raise RuntimeError(f"checkpoint {path!r} (read as a {kind} checkpoint) does not fit StableSR: "
                               f"{len(missing)} missing key(s) {missing[:10]}, {len(result.unexpected_keys)} "
                               f"unexpected key(s) {result.unexpected_keys[:10]}")
        if self.use_ema and (base or not any(k.startswith("model_ema.") for k in sd)):
            self.model_ema = LitEma(self._ema_targets(), decay=self.ema_decay)
        what = (f"a base LDM: {len(trained)} SFT / encoder keys keep their initialisation" if base
                else "a StableSR checkpoint") + "".join(f"; {n}" for n in notes)
        rank_zero_info(f"Restored StableSR from {path} ({what})")

    # ---- conditions ---------------------------------------------------------------------------------------------
    def lr_latent(self, lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """LR images (B, 3, h, w) in [-1, 1] -> bicubic to `size` (H, W) -> scaled first-stage posterior sample."""
        lr = lr.to(self.device, torch.float32)
        if tuple(lr.shape[-2:]) != tuple(size):
            lr = F.interpolate(lr, size=tuple(size), mode="bicubic", align_corners=False).clamp(-1.0, 1.0)
        return self.get_first_stage_encoding(lr)                            # (B, C_z, H/f, W/f)

    def get_input(self, batch: Mapping[str, Any], drop: bool | None = None) -> tuple[torch.Tensor, Condition]:
        """(z0 of the HR image, conditions incl. c_lr, the latent of the LR image upsampled to the HR size)."""
        z, cond = super().get_input(batch, drop)
        hr_size = tuple(self.get_image(batch).shape[-2:])
        cond["c_lr"] = self.lr_latent(self.get_image(batch, self.lr_key), hr_size)
        return z, cond

    def raw_condition(self, batch: Mapping[str, Any]) -> Any:
        """The empty prompt, always (StableSR trains with the prompt fixed to ''; cond_stage_key is not read)."""
        return self.cond_stage_model.null_condition(len(self.get_image(batch)), self.device)

    @torch.no_grad()
    def lr_condition(self, lr: torch.Tensor, scale: float | None = None, prompts: Sequence[str] | None = None
                     ) -> Condition:
        """The condition dict for sampling from LR images (B, 3, h, w) in [-1, 1], upsampled by `scale` (default
        sr_scale); the text condition is the empty prompt unless `prompts` are given."""
        scale = self.sr_scale if scale is None else scale
        size = (round(lr.shape[-2] * scale), round(lr.shape[-1] * scale))
        cond: Condition = {"c_lr": self.lr_latent(lr, size)}
        if self.cond_stage_model is not None:
            raw = list(prompts) if prompts is not None else self.cond_stage_model.null_condition(len(lr))
            cond[self.cond_stage_keyword] = self.get_learned_conditioning(raw)
        return cond

    def as_condition(self, cond: Any) -> Condition:
        """A dict with `c_lr` (see lr_condition) and the base model's conditions (the empty prompt if absent)."""
        if not isinstance(cond, Mapping) or "c_lr" not in cond:
            raise ValueError("StableSR samples from an LR latent: pass cond={'c_lr': (B, C_z, h, w), ...}, e.g. "
                             "model.lr_condition(lr_images)")
        c_lr = cond["c_lr"].to(self.device)
        rest = {k: v for k, v in cond.items() if k != "c_lr"}
        if self.cond_stage_keyword is not None and self.cond_stage_keyword not in rest:
            rest[self.cond_stage_keyword] = self.get_learned_conditioning(
                self.cond_stage_model.null_condition(len(c_lr), self.device))
        return super().as_condition(rest) | {"c_lr": c_lr}

    def null_condition(self, batch_size: int, cond: Any = None) -> Condition:
        """Guidance's null: the conditioner's (empty / negative prompt) with the same LR latent."""
        if cond is None:
            raise ValueError("StableSR.null_condition needs `cond` (its LR latent is kept)")
        cond = self.as_condition(cond)
        rest = {k: v for k, v in cond.items() if k != "c_lr"}
        null = super().null_condition(batch_size, rest) if rest else {}
        return null | {"c_lr": cond["c_lr"]}

    def sample_shape(self, batch_size: int, cond: Condition) -> tuple[int, ...]:
        return (batch_size, self.channels, *cond["c_lr"].shape[-2:])

    # ---- denoiser and sampling ----------------------------------------------------------------------------------
    def apply_model(self, x_t: torch.Tensor, t: torch.Tensor, c_lr: torch.Tensor | None = None,
                    **cond: torch.Tensor) -> torch.Tensor:
        """The denoiser: the encoder's features of (c_lr, t) modulate the U-Net at (x_t, t)."""
        if c_lr is None:
            raise ValueError("StableSR.apply_model needs c_lr, the LR image's latent (B, C_z, h, w)")
        struct_cond = self.structcond_stage_model(c_lr.to(x_t.dtype), t)    # {str(w): (B, semb, h_i, w_i)}
        return self.model(x_t, t, struct_cond=struct_cond, **cond)          # (B, C, h, w)

    @torch.no_grad()
    def sample_latents(self, cond: Any = None, batch_size: int | None = None, sampler: str = "ddim",
                       steps: int = 50, eta: float | None = None, guidance_scale: float = 1.0, uncond: Any = None,
                       generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None, x0: torch.Tensor | None = None, start_t: int | None = None,
                       **kwargs: Any):
        """As LatentDiffusion.sample_latents; with sample_start "lr" the chain starts at q_sample(c_lr, start_t, x_T)
        (start_t default T - 1; x_T: standard noise, drawn when not given). The sigma samplers start at the same
        point as img2img from c_lr at strength 1 (c_lr + sigma_max x_T in their variance-exploding variable)."""
        cond = self.as_condition(cond)
        if self.sample_start == "lr" and mask is None and kwargs.get("init") is None:
            c_lr = cond["c_lr"]
            noise = x_T.to(c_lr) if x_T is not None else randn_like(c_lr, generator)
            if noise.shape != c_lr.shape:
                raise ValueError(f"StableSR: x_T {tuple(noise.shape)} must have the LR latent's shape "
                                 f"{tuple(c_lr.shape)}")
            if sampler in SIGMA_SAMPLERS:
                x_T, kwargs = noise, {**kwargs, "init": c_lr, "strength": 1.0}
            else:
                start_t = self.num_timesteps - 1 if start_t is None else start_t
                t = torch.full((len(c_lr),), start_t, device=c_lr.device, dtype=torch.long)
                x_T = q_sample(c_lr, t, noise, self.schedule)              # (B, C_z, h, w)
        return super().sample_latents(cond, batch_size, sampler, steps, eta, guidance_scale, uncond, generator,
                                      x_T, mask, x0, start_t, **kwargs)

    # ---- image logging ------------------------------------------------------------------------------------------
    def condition_images(self, batch: Mapping[str, Any], x0: torch.Tensor,
                         class_names: Sequence[str] | None) -> dict[str, torch.Tensor]:
        """The first-stage reconstruction and the LR input upsampled to the output size."""
        images = {"reconstruction": self.decode(x0)}
        size = tuple(images["reconstruction"].shape[-2:])
        lr = self.get_image(batch, self.lr_key)
        images["lr_upsampled"] = F.interpolate(lr, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
        return images

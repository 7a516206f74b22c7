"""LatentDiffusion: DDPM in the latent space of a frozen first stage, with class / text / layout / concat conditions.

Keys follow SD 1.x: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`, `model_ema.*`, the
12 schedule buffers, and `scale_factor` with scale_by_std. Conditions are a dict of DiffusionWrapper keywords:
the conditioner's output goes to c_concat (conditioning_key concat), c_crossattn (crossattn, hybrid) or c_adm
(adm); inpainting (`masked_image_key` + `mask_key`) adds the first-stage latent of the masked image and the
resized mask to c_concat.
"""
import os
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_info

from ldm import visualization
from ldm.models.conditioning import drop_mask, drop_probabilities, replace_where
from ldm.models.ddpm import DDPM, Condition
from ldm.models.diffusion_wrapper import REQUIRED, check_conditioning_key
from ldm.models.first_stage_cache import FirstStageCache
from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.util import ConfigError, instantiate_from_config, with_params_when_restored

UNCONDITIONAL, FIRST_STAGE = "__is_unconditional__", "__is_first_stage__"
UNSET = (None, "", "???")
FIRST_STAGE_CKPT = "model.params.first_stage_config.params.ckpt_path"
# where the conditioner's output goes, per conditioning_key
COND_STAGE_KEYWORD = {"concat": "c_concat", "crossattn": "c_crossattn", "hybrid": "c_crossattn", "adm": "c_adm"}


class LatentDiffusion(DDPM):
    """Diffusion on z = scale_factor * E(x). `image_size`/`channels` describe the latents.

    Ours beyond CompVis/SD: `cond_drop_prob` (conditioning dropout for classifier-free guidance: one number or
    {concat|crossattn|adm: p}); `masked_image_key`/`mask_key` (inpainting condition); `allow_random_first_stage`
    (build without first-stage weights, and without the pretrained weights of a conditioner whose class has
    `params_when_restored` (OpenCLIP), for tests and when a checkpoint brings them, as with `ckpt_path`);
    `ema_decay`, `lr_warmup_steps`, `weight_decay`,
    `max_nonfinite_steps`;
    `first_stage_cache_size` (keep the frozen encoder's output for this many images, `FirstStageCache`: each
    epoch after the first skips the encoder; 0, the default, encodes every batch).
    """

    conditional = True

    def __init__(self, first_stage_config: Mapping, cond_stage_config: Mapping | str | None = None,
                 unet_config: Mapping | None = None, num_timesteps_cond: int | None = None,
                 cond_stage_key: str = "image", cond_stage_trainable: bool = False, concat_mode: bool = True,
                 cond_stage_forward: str | None = None, conditioning_key: str | None = None, scale_factor: float = 1.0,
                 scale_by_std: bool = False, cond_drop_prob: float | Mapping[str, float] = 0.0,
                 masked_image_key: str | None = None, mask_key: str | None = None,
                 allow_random_first_stage: bool = False, ckpt_path: str | None = None, ignore_keys: Sequence[str] = (),
                 load_only_unet: bool = False, timesteps: int = 1000, beta_schedule: str = "linear",
                 loss_type: str = "l2", monitor: str | None = "val/loss", use_ema: bool = True,
                 first_stage_key: str = "image", image_size: int = 64, channels: int = 4, log_every_t: int = 100,
                 clip_denoised: bool = False, linear_start: float = 1e-4, linear_end: float = 2e-2,
                 cosine_s: float = 8e-3, given_betas: Sequence[float] | None = None, original_elbo_weight: float = 0.0,
                 v_posterior: float = 0.0, l_simple_weight: float = 1.0, parameterization: str = "eps",
                 scheduler_config: Mapping | None = None, use_positional_encodings: bool = False,
                 learn_logvar: bool = False, logvar_init: float = 0.0, ema_decay: float = 0.9999,
                 lr_warmup_steps: int = 0, weight_decay: float = 0.01, snr_gamma: float | None = None,
                 first_stage_cache_size: int = 0, max_nonfinite_steps: int = 10):
        if unet_config is None:
            raise ConfigError("model.params.unet_config is missing")
        if num_timesteps_cond not in (None, 1):
            raise ConfigError(f"model.params.num_timesteps_cond={num_timesteps_cond}: the shortened conditioning "
                              "schedule (> 1) is not supported; use 1")
        has_cond_stage = cond_stage_config not in (None, UNCONDITIONAL)
        if conditioning_key is None and has_cond_stage:  # CompVis rule
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == UNCONDITIONAL and masked_image_key is None and conditioning_key is not None:
            rank_zero_info(f"model.params.conditioning_key={conditioning_key!r} ignored: cond_stage_config is "
                           f"{UNCONDITIONAL} (as in CompVis)")
            conditioning_key = None
        check_conditioning_key(conditioning_key)
        _check_condition_sources(conditioning_key, has_cond_stage, masked_image_key, mask_key)
        super().__init__(unet_config, timesteps=timesteps, beta_schedule=beta_schedule, loss_type=loss_type,
                         monitor=monitor, use_ema=use_ema, first_stage_key=first_stage_key, image_size=image_size,
                         channels=channels, log_every_t=log_every_t, clip_denoised=clip_denoised,
                         linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s, given_betas=given_betas,
                         original_elbo_weight=original_elbo_weight, v_posterior=v_posterior,
                         l_simple_weight=l_simple_weight, conditioning_key=conditioning_key,
                         parameterization=parameterization, scheduler_config=scheduler_config,
                         use_positional_encodings=use_positional_encodings, learn_logvar=learn_logvar,
                         logvar_init=logvar_init, ema_decay=ema_decay, lr_warmup_steps=lr_warmup_steps,
                         weight_decay=weight_decay, snr_gamma=snr_gamma, max_nonfinite_steps=max_nonfinite_steps)
        # ckpt_path: loaded below, once every stage exists
        self.conditioning_key, self.cond_stage_key = conditioning_key, cond_stage_key
        self.masked_image_key, self.mask_key = masked_image_key, mask_key
        self.scale_by_std, self._scale_factor_ready = scale_by_std, False
        if scale_by_std:  # saved with the checkpoint; a loaded value is never recomputed
            self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
            self.register_load_state_dict_pre_hook(_note_loaded_scale_factor)
        else:
            self.scale_factor = float(scale_factor)
        self.first_stage_model = build_first_stage(first_stage_config, allow_random_first_stage or bool(ckpt_path))
        if first_stage_cache_size < 0:
            raise ConfigError(f"model.params.first_stage_cache_size must be >= 0, got {first_stage_cache_size}")
        self.first_stage_cache = FirstStageCache(first_stage_cache_size)
        self.register_load_state_dict_post_hook(lambda module, _: module.first_stage_cache.clear())
        self.cond_stage_trainable, self.cond_stage_forward = cond_stage_trainable, cond_stage_forward
        restored = allow_random_first_stage or bool(ckpt_path)
        self.cond_stage_model = self._build_cond_stage(cond_stage_config, restored) if has_cond_stage else None
        self.cond_stage_keyword = COND_STAGE_KEYWORD[conditioning_key] if has_cond_stage else None
        self.conditioner_outputs = tuple(getattr(self.cond_stage_model, "condition_keys", ()))  # a dict's keys
        if conditioning_key == "hybrid" and masked_image_key is None and "c_concat" not in self.conditioner_outputs:
            raise ConfigError("model.params.conditioning_key=hybrid needs a c_concat source: masked_image_key/mask_key "
                              f"(inpainting) or a conditioner that draws one ({type(self.cond_stage_model).__name__} "
                              "does not; LayoutEmbedder does with raster_size)")
        self.cond_drop_prob = drop_probabilities(cond_drop_prob, REQUIRED[conditioning_key])
        self._check_null_available()
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys, load_only_unet)

    # ---- construction -------------------------------------------------------------------------------------------
    def _build_cond_stage(self, config: Mapping | str, restored: bool = False) -> nn.Module:
        if config == FIRST_STAGE:
            if self.cond_stage_trainable:
                raise ConfigError("model.params.cond_stage_trainable=true with __is_first_stage__: the first stage "
                                  "is frozen")
            return self.first_stage_model
        if isinstance(config, str):
            raise ConfigError(f"model.params.cond_stage_config={config!r}: expected a {{target, params}} mapping, "
                              f"{UNCONDITIONAL!r} or {FIRST_STAGE!r}")
        if restored:
            config = with_params_when_restored(config)
        model = instantiate_from_config(config, where="model.params.cond_stage_config")
        if self.cond_stage_forward is not None and not callable(getattr(model, self.cond_stage_forward, None)):
            raise ConfigError(f"model.params.cond_stage_forward={self.cond_stage_forward!r}: "
                              f"{type(model).__name__} has no such method")
        if not self.cond_stage_trainable:
            model.eval()
            model.requires_grad_(False)
        return model

    def _check_null_available(self) -> None:
        kw = self.cond_stage_keyword
        if kw not in (None, "c_concat") and self.cond_drop_prob[kw] > 0 \
                and not callable(getattr(self.cond_stage_model, "null_condition", None)):
            raise ConfigError(f"model.params.cond_drop_prob: the conditioner {type(self.cond_stage_model).__name__} "
                              "has no null_condition to drop to")

    def _apply(self, fn, *args, **kwargs):
        self.first_stage_cache.clear()  # cached encodings follow the weights' device and dtype
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True) -> "LatentDiffusion":
        """The first stage (and a frozen conditioner) stay in eval mode."""
        super().train(mode)
        self.first_stage_model.eval()
        if self.cond_stage_model is not None and not self.cond_stage_trainable:
            self.cond_stage_model.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        extra = list(self.cond_stage_model.parameters()) if self.cond_stage_trainable else []
        return super().trainable_parameters() + extra

    # ---- first stage --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Unscaled latents of images x (B, 3, H, W): a posterior sample (or its mode), or VQ pre-quantisation."""
        cache = self.first_stage_cache
        encoded = cache.encode(x, self.first_stage_model.encode) if cache.size else self.first_stage_model.encode(x)
        if isinstance(encoded, DiagonalGaussianDistribution):
            return encoded.sample() if sample else encoded.mode()
        if isinstance(encoded, torch.Tensor):
            return encoded
        raise TypeError(f"first stage {type(self.first_stage_model).__name__}.encode returned "
                        f"{type(encoded).__name__}; use AutoencoderKL or VQModelInterface")

    def get_first_stage_encoding(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        return self.scale_factor * self.encode_first_stage(x, sample)     # (B, C_z, H/f, W/f)

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(z / self.scale_factor)        # (B, 3, H, W)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_first_stage(z).clamp(-1.0, 1.0)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (the posterior mode): where img2img starts."""
        return self.get_first_stage_encoding(images.to(self.device, torch.float32), sample=False)

    def on_train_batch_start(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        if self.scale_by_std and not self._scale_factor_ready:
            self.init_scale_factor(batch)

    @torch.no_grad()
    def init_scale_factor(self, batch: Mapping[str, Any]) -> None:
        """scale_factor = 1 / std of the batch's latents, pooled over all DDP ranks (identical everywhere)."""
        z = self.encode_first_stage(self.get_image(batch)).double()
        stats = torch.stack([z.new_tensor(z.numel()), z.sum(), (z * z).sum()])  # (n, sum, sum of squares)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        n, total, squares = stats.tolist()
        std = ((squares - total * total / n) / (n - 1)) ** 0.5
        self.scale_factor.fill_(1.0 / std)
        self._scale_factor_ready = True
        rank_zero_info(f"scale_by_std: scale_factor = 1 / {std:.5f} = {1.0 / std:.5f} ({int(n)} latent values)")

    # ---- conditions ---------------------------------------------------------------------------------------------
    def get_learned_conditioning(self, c: Any) -> torch.Tensor:
        """Raw condition (captions, labels, layouts, maps, images) -> the conditioner's output."""
        if self.cond_stage_model is None:
            raise ValueError("get_learned_conditioning: this model has no conditioner (cond_stage_config)")
        if isinstance(c, torch.Tensor):
            c = c.to(self.device)
        if self.cond_stage_model is self.first_stage_model:
            return self.get_first_stage_encoding(c.float(), sample=False)
        model = self.cond_stage_model
        fn = getattr(model, self.cond_stage_forward) if self.cond_stage_forward else getattr(model, "encode", model)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cond_stage_trainable):
            out = fn(c)
        return out.mode() if isinstance(out, DiagonalGaussianDistribution) else out

    def get_input(self, batch: Mapping[str, Any], drop: bool | None = None) -> tuple[torch.Tensor, Condition]:
        """(latents z0, conditions); conditions are dropped (cond_drop_prob) when `drop`, default: in training."""
        z = self.get_first_stage_encoding(self.get_image(batch))
        return z, self.get_conditioning(batch, self.training if drop is None else drop)

    def get_conditioning(self, batch: Mapping[str, Any], drop: bool = False) -> Condition:
        """The condition dict of a batch: the conditioner's output, the inpainting latents + mask; with `drop`,
        each kind is replaced by its null with probability cond_drop_prob."""
        cond: Condition = {}
        n = len(self.get_image(batch))
        drops = {kw: drop_mask(n, p, self.device) for kw, p in self.cond_drop_prob.items() if drop and p > 0}
        if self.cond_stage_model is not None:
            raw = self.raw_condition(batch)
            kw = self.cond_stage_keyword
            if kw in drops and kw != "c_concat":
                raw = replace_where(drops[kw], raw, self.cond_stage_model.null_condition(n, self.device))
            learned = self.get_learned_conditioning(raw)
            cond.update(learned if isinstance(learned, Mapping) else {kw: learned})
        if self.masked_image_key is not None:
            parts = [cond["c_concat"]] if "c_concat" in cond else []
            cond["c_concat"] = torch.cat(parts + [self.inpainting_condition(batch)], dim=1)
        if "c_concat" in drops:
            cond["c_concat"] = replace_where(drops["c_concat"], cond["c_concat"], torch.zeros_like(cond["c_concat"]))
        return cond

    def raw_condition(self, batch: Mapping[str, Any]) -> Any:
        if self.cond_stage_key not in batch:
            raise KeyError(f"LatentDiffusion: batch has no key {self.cond_stage_key!r} (cond_stage_key); "
                           f"keys: {sorted(batch)}")
        c = batch[self.cond_stage_key]
        return c.to(self.device) if isinstance(c, torch.Tensor) else list(c)

    def inpainting_condition(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """[latent of the masked image, mask resized to the latent size] (B, C_z + 1, h, w); mask 1 = to fill."""
        z = self.get_first_stage_encoding(self.get_image(batch, self.masked_image_key), sample=False)
        mask = self.get_image(batch, self.mask_key)                          # (B, 1, H, W)
        return torch.cat([z, F.interpolate(mask, size=z.shape[-2:], mode="nearest").to(z)], dim=1)

    def as_condition(self, cond: Any) -> Condition:
        """None, a conditioner output (routed by conditioning_key) or a condition dict -> a condition dict."""
        if cond is None:
            cond = {}
        elif isinstance(cond, torch.Tensor):
            if self.cond_stage_keyword is None:
                raise ValueError("LatentDiffusion: this model has no conditioner; pass a condition dict")
            cond = {self.cond_stage_keyword: cond}
        needed = REQUIRED[self.conditioning_key]
        if not isinstance(cond, Mapping) or set(cond) != set(needed):
            got = sorted(cond) if isinstance(cond, Mapping) else type(cond).__name__
            raise ValueError(f"LatentDiffusion(conditioning_key={self.conditioning_key!r}) samples with conditions "
                             f"{list(needed)}; got {got}")
        return {k: v.to(self.device) for k, v in cond.items()}

    def null_condition(self, batch_size: int, cond: Any = None) -> Condition:
        """The 'no condition' of classifier-free guidance: the conditioner's null (empty caption, null class, empty
        layout) for c_crossattn / c_adm, and for c_concat when the conditioner makes it (a layout's box map);
        else for c_concat zeros when it was trained with dropout, else `cond`'s own (the LR image of
        super-resolution, the masked image of inpainting)."""
        null: Condition = {}
        learned = None
        for kw in REQUIRED[self.conditioning_key]:
            if kw != "c_concat" or (kw in self.conditioner_outputs and self.masked_image_key is None):
                if learned is None:
                    learned = self.get_learned_conditioning(self.cond_stage_model.null_condition(batch_size,
                                                                                                self.device))
                null[kw] = learned[kw] if isinstance(learned, Mapping) else learned
            elif cond is None:
                raise ValueError("null_condition: a concat-conditioned model needs `cond` to build the null")
            else:
                c = self.as_condition(cond)["c_concat"]
                null[kw] = torch.zeros_like(c) if self.cond_drop_prob[kw] > 0 else c
        return null

    def sample_shape(self, batch_size: int, cond: Condition) -> tuple[int, ...]:
        """Latent shape; with a concat condition, its spatial size."""
        size = tuple(cond["c_concat"].shape[-2:]) if "c_concat" in cond else (self.image_size, self.image_size)
        return (batch_size, self.channels, *size)

    # ---- image logging ------------------------------------------------------------------------------------------
    def condition_images(self, batch: Mapping[str, Any], x0: torch.Tensor,
                         class_names: Sequence[str] | None) -> dict[str, torch.Tensor]:
        """reconstruction (first stage), the conditioning drawn as a panel, the inpainting inputs."""
        images = {"reconstruction": self.decode(x0)}
        size = tuple(images["reconstruction"].shape[-2:])
        if self.cond_stage_model is not None and self.cond_stage_key != self.first_stage_key:
            images["conditioning"] = visualization.condition_panel(batch[self.cond_stage_key], size, class_names)
        if self.masked_image_key is not None:
            images["masked_image"] = self.get_image(batch, self.masked_image_key)
            images["mask"] = self.get_image(batch, self.mask_key) * 2.0 - 1.0
        return images


def _check_condition_sources(conditioning_key: str | None, has_cond_stage: bool, masked_image_key: str | None,
                             mask_key: str | None) -> None:
    """Each conditioning_key needs its sources: a conditioner and/or the inpainting pair."""
    if (masked_image_key is None) != (mask_key is None):
        raise ConfigError("model.params.masked_image_key and mask_key go together (inpainting); set both or neither")
    inpaint = masked_image_key is not None
    ok = {None: not has_cond_stage and not inpaint, "concat": has_cond_stage or inpaint,
          "crossattn": has_cond_stage and not inpaint, "adm": has_cond_stage and not inpaint,
          "hybrid": has_cond_stage}[conditioning_key]  # hybrid's c_concat source is checked once built
    if not ok:
        raise ConfigError(f"model.params.conditioning_key={conditioning_key!r} does not fit the condition sources "
                          f"(cond_stage_config {'set' if has_cond_stage else 'unset'}, masked_image_key/mask_key "
                          f"{'set' if inpaint else 'unset'}): none needs neither; concat needs either; crossattn and "
                          "adm need a conditioner only; hybrid needs a conditioner and a c_concat source")


def build_first_stage(config: Mapping, allow_random: bool) -> nn.Module:
    """The frozen (eval, no grad) first stage; its ckpt_path must name a file unless random weights are allowed
    (allow_random_first_stage, or a full model.params.ckpt_path that brings the first-stage weights)."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=False)
    if not isinstance(config, Mapping) or "target" not in config:
        raise ConfigError("model.params.first_stage_config must be a {target, params} mapping")
    params = dict(config.get("params") or {})
    path = params.get("ckpt_path")
    if path in UNSET:
        if not allow_random:
            raise ConfigError(f"{FIRST_STAGE_CKPT} is not set: point it at a trained autoencoder, e.g. "
                              f"{FIRST_STAGE_CKPT}=logs/<run>/checkpoints/last.ckpt (or set model.params.ckpt_path "
                              f"to a full latent-diffusion checkpoint)")
        params.pop("ckpt_path", None)
    elif not os.path.isfile(str(path)):
        raise FileNotFoundError(f"{FIRST_STAGE_CKPT}: {path!r} does not exist (train the first stage with "
                                f"main.py --base configs/autoencoder/<config>.yaml -t, then point here at its "
                                f"checkpoints/last.ckpt)")
    model = instantiate_from_config({"target": config["target"], "params": params},
                                    where="model.params.first_stage_config")
    model.eval()
    model.requires_grad_(False)
    return model


def _note_loaded_scale_factor(module: LatentDiffusion, state_dict: Mapping, prefix: str, *_) -> None:
    """A scale_factor that comes with a state dict is final: scale_by_std does not recompute it."""
    if prefix + "scale_factor" in state_dict:
        module._scale_factor_ready = True


"""DDPM: pixel-space denoising diffusion (Ho et al. 2020) as a thin Lightning module.

It composes a U-Net (`DiffusionWrapper`, keys `model.diffusion_model.*`), the 12 schedule buffers, an EMA copy
(`model_ema.*`) and the pure maths of `ldm.diffusion`: a training step is get_input -> p_losses -> log, and
sampling hands the denoiser `apply_model(x, t, **cond)` to an `ldm.diffusion` sampler. CompVis/SD parameter
names are accepted; values this implementation does not support raise a ConfigError naming them.
"""
import contextlib
from typing import Any, Callable, Mapping, Sequence

import pytorch_lightning as pl
import torch
import torch.nn as nn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from ldm import visualization
from ldm.checkpoint import CheckpointMismatchError, read_state_dict
from ldm.diffusion import (BUFFER_NAMES, PARAMETERIZATIONS, CFGDenoiser, DiffusionSchedule, lvlb_weights,
                           make_schedule, q_sample, sample_timesteps, target_for, training_loss)
from ldm.diffusion.losses import LOSS_TYPES, min_snr_weights
from ldm.diffusion.sampling import SAMPLERS, check_sampler, run_sampler  # noqa: F401 - SAMPLERS re-exported
from ldm.lr_schedules import COMPVIS_SCHEDULES, linear_cycle_schedule  # noqa: F401 (re-exported)
from ldm.models.diffusion_wrapper import DiffusionWrapper
from ldm.models.sharding import shard_diffusion_model
from ldm.models.nonfinite import NonFiniteGuard
from ldm.modules.ema import LitEma, ema_scope
from ldm.util import ConfigError, check_params, get_obj_from_str, instantiate_from_config

DEFAULT_BASE_LR = 1.0e-4  # main.py overrides `learning_rate`

Condition = dict[str, torch.Tensor]  # {"c_concat" | "c_crossattn" | "c_adm": tensor}


class DDPM(pl.LightningModule):
    """Unconditional diffusion on images batch[first_stage_key] (B, channels, image_size, image_size) in [-1, 1].

    Ours beyond CompVis: `ema_decay`, `lr_warmup_steps` (linear LR warm-up), `weight_decay` (AdamW), `snr_gamma`
    (min-SNR-gamma loss weighting, ldm.diffusion.losses.min_snr_weights; None: plain L_simple),
    `max_nonfinite_steps` (a NaN/inf loss skips its optimizer step; that many in a row stop training:
    ldm.models.nonfinite). The EMA is updated after each optimizer step (CompVis: after each batch; the same
    without gradient accumulation), inside the step, so a checkpoint written at the end of a batch holds it.
    """

    conditional = False  # LatentDiffusion routes conditions; a pixel-space DDPM has none

    def __init__(self, unet_config: Mapping, timesteps: int = 1000, beta_schedule: str = "linear",
                 loss_type: str = "l2", ckpt_path: str | None = None, ignore_keys: Sequence[str] = (),
                 load_only_unet: bool = False, monitor: str | None = "val/loss", use_ema: bool = True,
                 first_stage_key: str = "image", image_size: int = 256, channels: int = 3, log_every_t: int = 100,
                 clip_denoised: bool = True, linear_start: float = 1e-4, linear_end: float = 2e-2,
                 cosine_s: float = 8e-3, given_betas: Sequence[float] | None = None, original_elbo_weight: float = 0.0,
                 v_posterior: float = 0.0, l_simple_weight: float = 1.0, conditioning_key: str | None = None,
                 parameterization: str = "eps", scheduler_config: Mapping | None = None,
                 use_positional_encodings: bool = False, learn_logvar: bool = False, logvar_init: float = 0.0,
                 ema_decay: float = 0.9999, lr_warmup_steps: int = 0, weight_decay: float = 0.01,
                 snr_gamma: float | None = None, max_nonfinite_steps: int = 10):
        super().__init__()
        _check_choice("parameterization", parameterization, PARAMETERIZATIONS)
        _check_choice("loss_type", loss_type, LOSS_TYPES)
        if use_positional_encodings:
            raise ConfigError("model.params.use_positional_encodings=true is not supported; remove it")
        if conditioning_key is not None and not self.conditional:
            raise ConfigError(f"model.params.conditioning_key={conditioning_key!r}: {type(self).__name__} is "
                              "unconditional; use ldm.models.latent_diffusion.LatentDiffusion for conditioning")
        self.parameterization, self.loss_type, self.clip_denoised = parameterization, loss_type, clip_denoised
        self.first_stage_key, self.image_size, self.channels = first_stage_key, image_size, channels
        self.log_every_t, self.v_posterior = log_every_t, v_posterior
        self.original_elbo_weight, self.l_simple_weight = original_elbo_weight, l_simple_weight
        if snr_gamma is not None and not snr_gamma > 0:
            raise ConfigError(f"model.params.snr_gamma={snr_gamma}: must be > 0 (or null for plain L_simple)")
        self.snr_gamma = snr_gamma
        self.weight_decay, self.lr_warmup_steps, self.learn_logvar = weight_decay, lr_warmup_steps, learn_logvar
        self.weight_loss_by_logvar = learn_logvar or logvar_init != 0  # L / exp(logvar_t) + logvar_t
        self.lr_schedule = lr_schedule_from_config(scheduler_config)
        self.learning_rate = DEFAULT_BASE_LR
        if monitor is not None:
            self.monitor = monitor
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        logvar = torch.full((self.num_timesteps,), float(logvar_init))
        if learn_logvar:
            self.logvar = nn.Parameter(logvar)
        else:  # not a checkpoint key (SD 1.x has none)
            self.register_buffer("logvar", logvar, persistent=False)
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self._skip_step = False                      # a non-finite loss since the last optimizer step
        self.use_ema, self.ema_decay, self._in_ema_scope = use_ema, ema_decay, False
        if use_ema:
            self.model_ema = LitEma(self._ema_targets(), decay=ema_decay)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys, load_only_unet)

    # ---- schedule -----------------------------------------------------------------------------------------------
    def register_schedule(self, given_betas=None, beta_schedule: str = "linear", timesteps: int = 1000,
                          linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3) -> None:
        """The 12 CompVis schedule buffers (float32), and the ELBO weights (not saved) when they are used."""
        try:
            schedule = make_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s,
                                     given_betas, self.v_posterior)
        except ValueError as err:
            raise ConfigError(f"model.params (beta_schedule / timesteps / given_betas): {err}") from err
        for name, value in schedule.buffers(torch.float32).items():
            self.register_buffer(name, value)
        self.num_timesteps = schedule.num_timesteps
        if self.original_elbo_weight != 0:
            weights = lvlb_weights(schedule, self.parameterization).float()
            self.register_buffer("lvlb_weights", weights, persistent=False)
        if self.snr_gamma is not None:
            weights = min_snr_weights(schedule.alphas_cumprod, self.snr_gamma, self.parameterization).float()
            self.register_buffer("snr_weights", weights, persistent=False)

    @property
    def schedule(self) -> DiffusionSchedule:
        """The schedule buffers, on the module's device."""
        return DiffusionSchedule.from_mapping({name: getattr(self, name) for name in BUFFER_NAMES})

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False) -> None:
        """Load a `.ckpt`/`.safetensors` strictly, except keys starting with an `ignore_keys` prefix; `model_ema.*`
        is dropped without use_ema and re-initialised from the loaded U-Net when the file has none.
        only_model (load_only_unet): load only the `model.diffusion_model.*` keys."""
        ignore = tuple(ignore_keys)
        sd = {k: v for k, v in read_state_dict(path).items() if not (ignore and k.startswith(ignore))}
        if only_model:
            sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
            if not sd:
                raise RuntimeError(f"checkpoint {path!r} has no model.diffusion_model.* keys (load_only_unet)")
        elif not self.use_ema:
            sd = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
        ema_in_file = any(k.startswith("model_ema.") for k in sd)
        target = self.model if only_model else self
        try:
            result = target.load_state_dict(sd, strict=False)
        except RuntimeError as err:
            raise CheckpointMismatchError(f"checkpoint {path!r} does not fit {type(self).__name__}: {err}") from err
        missing = [k for k in result.missing_keys
                   if not ((ignore and k.startswith(ignore)) or (k.startswith("model_ema.") and not ema_in_file))]
        if missing or result.unexpected_keys:
            raise CheckpointMismatchError(f"checkpoint {path!r} does not fit {type(self).__name__}: {len(missing)} "
                                          f"missing key(s) {missing[:10]}, {len(result.unexpected_keys)} unexpected "
                                          f"key(s) {result.unexpected_keys[:10]} (ignore_keys skips prefixes; "
                                          f"load_only_unet loads only model.diffusion_model.*)")
        if self.use_ema and not ema_in_file:
            self.model_ema = LitEma(self._ema_targets(), decay=self.ema_decay)
        rank_zero_info(f"Restored {type(self).__name__} from {path}: {len(sd)} keys"
                       + (" (U-Net only)" if only_model else ""))

    # ---- inputs and loss ----------------------------------------------------------------------------------------
    def get_image(self, batch: Mapping[str, Any], key: str | None = None) -> torch.Tensor:
        """batch[key] (default first_stage_key) as a float (B, C, H, W) tensor on the module's device."""
        key = key or self.first_stage_key
        if key not in batch:
            raise KeyError(f"{type(self).__name__}: batch has no key {key!r}; keys: {sorted(batch)}")
        x = batch[key]
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}: batch[{key!r}] must be a (B, C, H, W) channels-first tensor, "
                             f"got {shape}")
        return x.to(self.device, torch.float32).contiguous()

    def get_input(self, batch: Mapping[str, Any], drop: bool | None = None) -> tuple[torch.Tensor, Condition]:
        """(x0, conditions) of a batch; a DDPM has no conditions."""
        x = self.get_image(batch)
        if x.shape[1] != self.channels:
            raise ValueError(f"DDPM: batch[{self.first_stage_key!r}] has {x.shape[1]} channels, "
                             f"model.params.channels={self.channels}")
        return x, {}

    def apply_model(self, x_t: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        """The denoiser: raw eps / x0 / v prediction (B, C, H, W) at integer timesteps t (B,)."""
        return self.model(x_t, t, **cond)

    def p_losses(self, x0: torch.Tensor, cond: Condition, t: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of the denoiser at x_t = q_sample(x0, t, noise) (t uniform, noise standard unless given)."""
        t = sample_timesteps(len(x0), self.num_timesteps, x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        schedule = self.schedule
        x_t = q_sample(x0, t, noise, schedule)                               # (B, C, H, W)
        output = self.apply_model(x_t, t, **cond)                            # (B, C, H, W)
        target = target_for(self.parameterization, x0, noise, t, schedule)
        logvar = self.logvar if self.weight_loss_by_logvar else None
        return training_loss(output, target, t, self.loss_type, logvar, self.l_simple_weight,
                             self.original_elbo_weight, getattr(self, "lvlb_weights", None),
                             getattr(self, "snr_weights", None))

    # ---- training -----------------------------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        x0, cond = self.get_input(batch)
        loss, logs = self.p_losses(x0, cond)
        self._skip_step |= not self.nonfinite.finite(self, loss)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=True, on_step=True, on_epoch=False,
                      batch_size=len(x0))
        return loss

    def configure_model(self) -> None:
        """Under --strategy fsdp (Lightning's ModelParallelStrategy gives a device mesh) shard the U-Net and EMA."""
        if self.device_mesh is not None:
            self.shard(self.device_mesh["data_parallel"])

    def shard(self, mesh) -> None:
        """FSDP2 over `mesh` (ldm.models.sharding)."""
        shard_diffusion_model(self, mesh)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Lightning's step (closure: training_step and backward), not taken when a loss since the last step was
        non-finite; then the EMA update, so that checkpoints written at the end of the batch (the pre-emption save,
        ModelCheckpoint's every_n_train_steps) hold the EMA of the same step."""
        loss = optimizer_closure()
        if self._skip_step:
            self._skip_step = False
            return
        optimizer.step(closure=lambda: loss)
        self.update_ema()

    def update_ema(self) -> None:
        if self.use_ema:
            self.model_ema(self._ema_targets())

    @property
    def nonfinite_streak(self) -> int:
        """Training steps in a row whose loss was NaN/inf (0 after a good step): LastCheckpoint saves only at 0."""
        return self.nonfinite.streak

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """val/loss* with the training weights and val/loss*_ema with the EMA weights, at the same (t, noise)."""
        x0, cond = self.get_input(batch)
        t = sample_timesteps(len(x0), self.num_timesteps, x0.device)
        noise = torch.randn_like(x0)
        _, logs = self.p_losses(x0, cond, t, noise)
        with self.ema_scope():
            _, logs_ema = self.p_losses(x0, cond, t, noise)
        logs = {f"val/{k}": v for k, v in logs.items()} | {f"val/{k}_ema": v for k, v in logs_ema.items()}
        self.log_dict(logs, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(x0))

    def _ema_targets(self) -> nn.Module:
        """What the EMA tracks (its trainable parameters): the U-Net wrapper (keys `model_ema.diffusion_model*`)."""
        return self.model

    @contextlib.contextmanager
    def ema_scope(self, enabled: bool = True):
        """Within the block the U-Net holds its EMA weights (no-op without use_ema; re-entrant)."""
        if self._in_ema_scope or not (self.use_ema and enabled):
            yield
            return
        self._in_ema_scope = True
        try:
            with ema_scope(self.model_ema, self._ema_targets()):
                yield
        finally:
            self._in_ema_scope = False

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What AdamW updates: the U-Net (and the learned log-variance)."""
        return list(self.model.parameters()) + ([self.logvar] if self.learn_logvar else [])

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        if self.lr_warmup_steps <= 0 and self.lr_schedule is None:
            return opt
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=self.lr_multiplier)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def lr_multiplier(self, step: int) -> float:
        """Linear warm-up over lr_warmup_steps, times scheduler_config's factor when given."""
        mult = min(1.0, (step + 1) / self.lr_warmup_steps) if self.lr_warmup_steps > 0 else 1.0
        return mult * (float(self.lr_schedule(step)) if self.lr_schedule is not None else 1.0)

    # ---- sampling -----------------------------------------------------------------------------------------------
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Sampled space -> images in [-1, 1] (pixel space: clamp)."""
        return x.clamp(-1.0, 1.0)

    def as_condition(self, cond: Any) -> Condition:
        if cond is not None and not (isinstance(cond, Mapping) and not cond):
            raise ValueError(f"{type(self).__name__} is unconditional; sample with cond=None")
        return {}

    def null_condition(self, batch_size: int, cond: Condition | None = None) -> Condition:
        raise ValueError(f"{type(self).__name__} is unconditional: guidance_scale must be 1")

    def sample_shape(self, batch_size: int, cond: Condition) -> tuple[int, ...]:
        return (batch_size, self.channels, self.image_size, self.image_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the sampled space (pixel space: the images themselves); img2img starts here."""
        return images.to(self.device, torch.float32)

    @torch.no_grad()
    def sample_latents(self, cond: Any = None, batch_size: int | None = None, sampler: str = "ddim",
                       steps: int = 50, eta: float | None = None, guidance_scale: float = 1.0, uncond: Any = None,
                       generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None, x0: torch.Tensor | None = None, start_t: int | None = None,
                       progress: bool = False, return_intermediates: bool = False, use_ema: bool = True,
                       sigma_schedule: str = "uniform", init: torch.Tensor | None = None,
                       strength: float | None = None):
        """Samples in the model's space (pixels, or latents for LatentDiffusion); see `sample`."""
        check_sampler(sampler, sigma_schedule)
        cond = self.as_condition(cond)
        batch_size = _batch_size(batch_size, cond, x_T)
        denoise: Callable[..., torch.Tensor] = self.apply_model
        if guidance_scale != 1.0:
            uncond = self.null_condition(batch_size, cond) if uncond is None else self.as_condition(uncond)
            denoise = CFGDenoiser(self.apply_model, guidance_scale, uncond)
        start = x_T if x_T is not None else self.sample_shape(batch_size, cond)
        with self.ema_scope(enabled=use_ema):
            return run_sampler(denoise, start, self.schedule, self.parameterization, sampler, steps, eta,
                               sigma_schedule, clip_denoised=self.clip_denoised, extra_args=cond, init=init,
                               strength=strength, mask=mask, x0=x0, start_t=start_t, generator=generator,
                               return_intermediates=return_intermediates, progress=progress)

    @torch.no_grad()
    def sample(self, cond: Any = None, batch_size: int | None = None, sampler: str = "ddim", steps: int = 50,
               eta: float | None = None, guidance_scale: float = 1.0, uncond: Any = None,
               generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, x0: torch.Tensor | None = None, start_t: int | None = None,
               progress: bool = False, return_latents: bool = False, use_ema: bool = True,
               sigma_schedule: str = "uniform", init: torch.Tensor | None = None, strength: float | None = None):
        """Images (B, C, H, W) in [-1, 1], and the sampled latents too with return_latents.

        cond: None, `get_learned_conditioning(...)` output, or a dict of c_concat / c_crossattn / c_adm tensors.
        sampler: "ddpm" (all T steps; `steps` unused), "ddim" (`steps`, `eta`, default 0), "plms" (`steps`), or a
        sigma sampler of ldm.diffusion.sampling (euler, euler_a, heun, dpmpp_2m, dpmpp_2m_sde, dpmpp_2s_a, unipc)
        over `sigma_schedule` (uniform, karras, exponential); euler_a, dpmpp_2m_sde and dpmpp_2s_a take `eta`
        (default 1). guidance_scale != 1: classifier-free guidance against `uncond` (default `null_condition`).
        x_T: the starting noise; init (sampled space, `encode`) and strength in (0, 1]: img2img from init noised by
        x_T; mask (1 = known) and x0 (default init): inpainting in the sampled space; start_t: a discrete
        sampler's start with x_T already noised there; generator: source of all randomness (same seed, same
        images); use_ema: sample with the EMA weights.
        """
        latents = self.sample_latents(cond, batch_size, sampler, steps, eta, guidance_scale, uncond, generator,
                                      x_T, mask, x0, start_t, progress=progress, use_ema=use_ema,
                                      sigma_schedule=sigma_schedule, init=init, strength=strength)
        images = self.decode(latents).clamp(-1.0, 1.0)
        return (images, latents) if return_latents else images

    # ---- image logging ------------------------------------------------------------------------------------------
    def condition_images(self, batch: Mapping[str, Any], x0: torch.Tensor,
                         class_names: Sequence[str] | None) -> dict[str, torch.Tensor]:
        """Extra panels (reconstructions, conditioning) of subclasses."""
        return {}

    def diffusion_row(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One grid image: each row a sample, each column q_sample at t = 0, log_every_t, 2 log_every_t, ..., T-1."""
        ts = [t for t in range(self.num_timesteps) if t % self.log_every_t == 0 or t == self.num_timesteps - 1]
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        schedule = self.schedule
        columns = [self.decode(q_sample(x0, torch.full((len(x0),), t, device=x0.device), noise, schedule))
                   for t in ts]
        return visualization.image_grid(columns)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, split: str = "train", sample: bool = True,
                   sampler: str = "ddim", ddim_steps: int = 50, ddim_eta: float = 0.0, guidance_scale: float = 1.0,
                   plot_denoise_rows: bool = False, plot_diffusion_rows: bool = True, seed: int = 0,
                   class_names: Sequence[str] | None = None, **ignored) -> dict[str, torch.Tensor]:
        """name -> (N', C, H, W) in [-1, 1]: inputs, (subclass panels), diffusion_row, samples (EMA, fixed seed),
        denoise_row (x0 predictions along the chain) and samples_cfg_scale_<s> when guidance_scale != 1."""
        if ignored:
            rank_zero_warn(f"{type(self).__name__}.log_images ignores {sorted(ignored)}")
        batch = visualization.first_n(batch, N)
        x0, cond = self.get_input(batch, drop=False)
        generator = torch.Generator().manual_seed(seed)
        logs = {"inputs": self.get_image(batch)} | self.condition_images(batch, x0, class_names)
        if plot_diffusion_rows:
            logs["diffusion_row"] = self.diffusion_row(x0, generator)
        if sample:
            args = dict(sampler=sampler, steps=ddim_steps, eta=ddim_eta)
            x_T = torch.randn(self.sample_shape(len(x0), cond), generator=generator).to(self.device)
            latents, x0_preds = self.sample_latents(cond, x_T=x_T, return_intermediates=True, **args)
            logs["samples"] = self.decode(latents)
            if plot_denoise_rows:
                logs["denoise_row"] = visualization.image_grid([self.decode(p) for p in x0_preds])
            if guidance_scale != 1.0:
                guided = self.sample_latents(cond, x_T=x_T, guidance_scale=guidance_scale, **args)
                logs[f"samples_cfg_scale_{guidance_scale:.2f}"] = self.decode(guided)
        return {k: v.float().clamp(-1.0, 1.0) for k, v in logs.items()}


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"model.params.{name}={value!r} is not supported; choose one of {tuple(choices)}")


def _batch_size(batch_size: int | None, cond: Condition, x_T: torch.Tensor | None) -> int:
    """The batch size given, else that of the conditions or x_T; a mismatch is an error."""
    sizes = {len(c) for c in cond.values()} | ({len(x_T)} if x_T is not None else set())
    if batch_size is not None:
        sizes.add(batch_size)
    if not sizes:
        raise ValueError("sample: give batch_size (or conditions or x_T to take it from)")
    if len(sizes) != 1:
        raise ValueError(f"sample: batch_size ({batch_size}), the conditions and x_T disagree on the batch size: "
                         f"{sorted(sizes)}")
    return sizes.pop()


def lr_schedule_from_config(config: Mapping | None) -> Callable[[int], float] | None:
    """scheduler_config -> step -> LR factor. CompVis' `*.LambdaWarmUpCosineScheduler`, `*2` and
    `*.LambdaLinearScheduler` are read from their params (ldm.lr_schedules; that module need not exist); any other
    target is instantiated and used through its `schedule` method or as a callable."""
    if config is None:
        return None
    target = str(config.get("target", ""))
    builder = COMPVIS_SCHEDULES.get(target.rsplit(".", 1)[-1])
    if builder is not None:
        params = dict(config.get("params") or {})
        check_params(builder, params, "model.params.scheduler_config")
        return builder(**params)
    get_obj_from_str(target)  # a clear error for an unknown target
    obj = instantiate_from_config(config, where="model.params.scheduler_config")
    fn = getattr(obj, "schedule", obj)
    if not callable(fn):
        raise ConfigError(f"model.params.scheduler_config: {target} is neither callable nor has a schedule(step)")
    return fn

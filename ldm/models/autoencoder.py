"""Lightning modules of the first stage: KL (AutoencoderKL) and VQ (VQModel, VQModelInterface) autoencoders.

Training is GAN-style manual optimisation with two Adam optimizers (betas 0.5, 0.9): the generator
(encoder, decoder, quant convs, codebook and the loss' learnable logvar) and the PatchGAN discriminator.
`trainer.global_step` counts training batches: the discriminator is stepped through the strategy's
precision plugin (AMP scaling, clipping hook) but not through LightningOptimizer.step, which would
count a second step per batch in Lightning 2.
"""
import contextlib
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ldm.checkpoint import CheckpointMismatchError, read_state_dict
from ldm.models.nonfinite import NonFiniteGuard
from ldm.modules.autoencoder import Decoder, Encoder
from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma, ema_scope
from ldm.modules.quantize import VectorQuantizer
from ldm.util import ConfigError, instantiate_from_config

DEFAULT_BASE_LR = 4.5e-6  # CompVis base_learning_rate; main.py overrides `learning_rate`


class AutoencoderBase(pl.LightningModule):
    """Shared training, validation, image logging and checkpoint loading; subclasses add the bottleneck.

    Subclasses implement `_reconstruct(x) -> (xrec, reg_loss, logs)` and `_autoencoder_modules()`,
    then call `_finish_init(ckpt_path, ignore_keys)` at the end of their __init__. A model whose target is not
    its input (StableSR's CFW decodes a latent towards a ground truth) overrides `reconstruction_pair(batch)`;
    one that trains only part of itself overrides `generator_parameters()`.
    """

    def __init__(self, ddconfig: Mapping, lossconfig: Mapping, embed_dim: int, image_key: str = "image",
                 colorize_nlabels: int | None = None, monitor: str | None = None, use_ema: bool = False,
                 ema_decay: float = 0.9999, grad_clip: float | None = None, lr_warmup_steps: int = 0,
                 lr_g_factor: float = 1.0, scheduler_config: Mapping | None = None,
                 batch_resize_range: Sequence[int] | None = None, max_nonfinite_steps: int = 10):
        super().__init__()
        self.automatic_optimization = False
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)         # generator loss
        self.nonfinite_disc = NonFiniteGuard(max_nonfinite_steps)    # discriminator loss
        self.image_key, self.embed_dim, self.monitor = image_key, embed_dim, monitor
        self.in_channels = ddconfig["in_channels"]
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig, where="model.params.lossconfig")
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        self.colorize_nlabels = colorize_nlabels
        self.use_ema, self.ema_decay = use_ema, ema_decay
        self.grad_clip, self.lr_warmup_steps, self.lr_g_factor = grad_clip, lr_warmup_steps, lr_g_factor
        self.lr_schedule = instantiate_from_config(scheduler_config, where="model.params.scheduler_config") \
            if scheduler_config is not None else None
        self.batch_resize_range = batch_resize_range
        self.learning_rate = DEFAULT_BASE_LR

    # ---- construction and checkpoints -------------------------------------------------------------------------
    def _autoencoder_modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def _reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> its reconstruction as evaluation sees it (posterior mode / quantised latents)."""
        was_training = self.training
        self.eval()
        try:
            return self._reconstruct(x)[0]
        finally:
            self.train(was_training)

    def _ema_targets(self) -> nn.ModuleDict:
        """The autoencoder proper (not the loss); EMA keys read `model_ema.encoderconv_inweight` etc."""
        return nn.ModuleDict(self._autoencoder_modules())

    def _finish_init(self, ckpt_path: str | None, ignore_keys: Sequence[str]) -> None:
        if self.use_ema:
            self.model_ema = LitEma(self._ema_targets(), decay=self.ema_decay)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    def has_training_loss(self) -> bool:
        return hasattr(self.loss, "generator_loss")

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = ()) -> None:
        """Load weights strictly, except: keys starting with an `ignore_keys` prefix keep their initial values,
        `loss.*` is dropped without a training loss (and may be absent with one), `model_ema.*` is dropped
        without use_ema (and re-initialised from the loaded weights when absent with it). A full LDM file
        is accepted too: its `first_stage_model.*` keys are used."""
        sd = read_state_dict(path)
        if not any(k.startswith("encoder.") for k in sd) and any(k.startswith("first_stage_model.") for k in sd):
            sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
        ignore = tuple(ignore_keys)
        dropped = {k for k in sd if (ignore and k.startswith(ignore))
                   or (k.startswith("loss.") and not self.has_training_loss())
                   or (k.startswith("model_ema.") and not self.use_ema)}
        sd = {k: v for k, v in sd.items() if k not in dropped}
        ema_in_file = any(k.startswith("model_ema.") for k in sd)
        try:
            result = self.load_state_dict(sd, strict=False)
        except RuntimeError as err:
            raise CheckpointMismatchError(f"checkpoint {path!r} does not fit {type(self).__name__}: {err}") from err
        missing = [k for k in result.missing_keys if not ((ignore and k.startswith(ignore)) or k.startswith("loss.")
                                                          or (k.startswith("model_ema.") and not ema_in_file))]
        if missing or result.unexpected_keys:
            raise CheckpointMismatchError(f"checkpoint {path!r} does not fit {type(self).__name__}: "
                               f"{len(missing)} missing key(s) {missing[:10]}, {len(result.unexpected_keys)} "
                               f"unexpected key(s) {result.unexpected_keys[:10]} (use ignore_keys to skip prefixes)")
        if self.use_ema and not ema_in_file:
            self.model_ema = LitEma(self._ema_targets(), decay=self.ema_decay)
        kept = [k for k in result.missing_keys if k not in missing]
        rank_zero_info(f"Restored {type(self).__name__} from {path}: {len(sd)} keys loaded, {len(dropped)} dropped, "
                       f"{len(kept)} kept at initialisation")

    # ---- inputs -----------------------------------------------------------------------------------------------
    def reconstruction_pair(self, batch: Mapping[str, Any]):
        """(target x, reconstruction, reg_loss, logs) of a batch: here the input and its reconstruction."""
        x = self.get_input(batch)
        return (x, *self._reconstruct(x))

    def get_input(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """batch[image_key] as (B, C, H, W); integer label maps (B, H, W) become one-hot with colorize_nlabels."""
        if self.image_key not in batch:
            raise KeyError(f"{type(self).__name__}: batch has no key {self.image_key!r} (image_key); "
                           f"keys: {sorted(batch)}")
        x = batch[self.image_key]
        if not torch.is_floating_point(x) and self.colorize_nlabels is not None and x.dim() == 3:
            x = F.one_hot(x.long(), self.colorize_nlabels).permute(0, 3, 1, 2).to(self.dtype)  # (B, n, H, W)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: batch[{self.image_key!r}] must be (B, {self.in_channels}, H, W) "
                             f"channels-first, got shape {tuple(x.shape)}")
        x = x.contiguous()
        if self.batch_resize_range is not None and self.training:
            lower, upper = self.batch_resize_range
            sizes = range(lower, upper + 1, 16)
            size = upper if self.global_step <= 4 else sizes[int(torch.randint(len(sizes), ()))]
            if size != x.shape[2]:
                x = F.interpolate(x, size=size, mode="bicubic")   # (B, C, size, size)
        return x

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Project a colorize_nlabels-channel map to 3 channels in [-1, 1] with a fixed random matrix."""
        x = F.conv2d(x, weight=self.colorize.to(x.dtype))        # (B, 3, H, W)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    @contextlib.contextmanager
    def ema_scope(self):
        """Within the block the autoencoder holds its EMA weights (no-op without use_ema)."""
        with ema_scope(self.model_ema if self.use_ema else None, self._ema_targets()):
            yield

    # ---- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        if not self.has_training_loss():
            name = getattr(self.loss, "original_target", type(self.loss).__name__)  # ldm.compat.Unserved
            raise ConfigError(f"{type(self).__name__}: lossconfig target {name} has no training loss; set "
                              f"model.params.lossconfig to an autoencoder loss to train")
        params_g = self.generator_parameters()
        opt_g = torch.optim.Adam(params_g, lr=self.lr_g_factor * self.learning_rate, betas=(0.5, 0.9))
        opt_d = torch.optim.Adam(self.loss.discriminator.parameters(), lr=self.learning_rate, betas=(0.5, 0.9))
        return [opt_g, opt_d]

    def generator_parameters(self) -> list[nn.Parameter]:
        """What the generator optimizer trains: the autoencoder and the loss' own parameters (logvar)."""
        params = [p for m in self._autoencoder_modules().values() for p in m.parameters()]
        return params + list(self.loss.autoencoder_parameters())

    def lr_multiplier(self, step: int) -> float:
        """Linear warm-up over lr_warmup_steps, times scheduler_config's f(step) when given."""
        mult = min(1.0, (step + 1) / self.lr_warmup_steps) if self.lr_warmup_steps > 0 else 1.0
        return mult * (float(self.lr_schedule(step)) if self.lr_schedule is not None else 1.0)

    def _set_lr(self, opt_g, opt_d, step: int) -> None:
        mult = self.lr_multiplier(step)
        for opt, base in ((opt_g, self.lr_g_factor * self.learning_rate), (opt_d, self.learning_rate)):
            for group in opt.param_groups:
                group["lr"] = base * mult

    def _step_without_progress(self, optimizer) -> None:
        """optimizer.step() through the strategy and precision plugin, without counting a global step."""
        self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.grad_clip:  # after AMP unscaling: the precision plugin calls this hook post-unscale
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")

    def training_step(self, batch, batch_idx):
        """Generator step, then (once active) discriminator step, then the EMA update. A NaN/inf generator loss
        skips the whole step (global_step does not advance), a NaN/inf discriminator loss the discriminator's."""
        step = self.global_step                                    # batches trained so far
        opt_g, opt_d = self.optimizers()
        self._set_lr(opt_g, opt_d, step)
        x, xrec, reg_loss, logs = self.reconstruction_pair(batch)
        with self.toggled_optimizer(opt_g):                        # no discriminator grads in the generator step
            g_loss, log_g = self.loss.generator_loss(x, xrec, reg_loss, step, last_layer=self.get_last_layer(),
                                                     split="train")
            self.log("train/aeloss", g_loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
            if not self.nonfinite.finite(self, g_loss, "generator loss"):
                return
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(g_loss)
            opt_g.step()                                           # global_step += 1
        log = {f"train/{k}": v for k, v in logs.items()} | dict(log_g)
        if self.loss.disc_active(step):
            d_loss, log_d = self.loss.discriminator_loss(x, xrec.detach(), step, split="train")
            if self.nonfinite_disc.finite(self, d_loss, "discriminator loss"):
                opt_d.zero_grad(set_to_none=True)
                self.manual_backward(d_loss)
                self._step_without_progress(opt_d)
            log.update(log_d)
        self.log_dict({k: v.detach() if torch.is_tensor(v) else v for k, v in log.items()},
                      on_step=True, on_epoch=False)
        self.update_ema()  # in the step: checkpoints written at the end of the batch hold this step's EMA

    def update_ema(self) -> None:
        if self.use_ema:
            self.model_ema(self._ema_targets())

    @property
    def nonfinite_streak(self) -> int:
        """Steps in a row with a NaN/inf loss (0 after a good step): LastCheckpoint saves only at 0."""
        return max(self.nonfinite.streak, self.nonfinite_disc.streak)

    # ---- validation and images --------------------------------------------------------------------------------
    @torch.no_grad()
    def quality_metrics(self, x: torch.Tensor, xrec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean per-image PSNR (dB) and SSIM on images mapped from [-1, 1] to [0, 1] (data_range 1), and LPIPS
        (the loss' perceptual model, inputs in [-1, 1]) when the loss has one."""
        x01 = ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        rec01 = ((xrec.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        metrics = {"psnr": peak_signal_noise_ratio(rec01, x01, data_range=1.0, reduction="none",
                                                   dim=(1, 2, 3)).mean(),
                   "ssim": structural_similarity_index_measure(rec01, x01, data_range=1.0)}
        perceptual = getattr(self.loss, "perceptual_loss", None)
        if perceptual is not None and x.shape[1] == 3:
            metrics["lpips"] = perceptual(x.float(), xrec.float().clamp(-1.0, 1.0)).mean()
        return metrics

    def validation_step(self, batch, batch_idx):
        with self.ema_scope():
            x, xrec, reg_loss, logs = self.reconstruction_pair(batch)
        log = {f"val/{k}": v for k, v in (logs | self.quality_metrics(x, xrec)).items()}
        if self.has_training_loss():
            _, log_g = self.loss.generator_loss(x, xrec, reg_loss, self.global_step,
                                                last_layer=self.get_last_layer(), split="val")
            _, log_d = self.loss.discriminator_loss(x, xrec, self.global_step, split="val")
            log.update(log_g)
            log.update(log_d)
        self.log_dict(log, on_step=False, on_epoch=True, sync_dist=True, batch_size=x.shape[0])

    def _extra_images(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    @torch.no_grad()
    def log_images(self, batch, N: int = 4, **kwargs) -> dict[str, torch.Tensor]:
        """`inputs`, `reconstructions` (+ subclass extras) in [-1, 1] for the image logger, in eval mode and
        with EMA weights; keyword arguments from the logger (split, ...) are ignored."""
        was_training = self.training
        self.eval()
        try:
            x = self.get_input(batch)[:N]
            with self.ema_scope():
                xrec = self._reconstruct(x)[0]
                images = {"inputs": x, "reconstructions": xrec, **self._extra_images(x)}
        finally:
            self.train(was_training)
        if x.shape[1] > 3:
            images = {k: self.to_rgb(v) for k, v in images.items()}
        return {k: v.clamp(-1.0, 1.0) for k, v in images.items()}


class AutoencoderKL(AutoencoderBase):
    """KL-regularised autoencoder: encode(x) is a diagonal Gaussian over (B, embed_dim, H/f, W/f) latents.

    posterior_logvar_init (not in CompVis) starts the posterior's log-variance near that value (the
    logvar half of quant_conv's bias) instead of ~0. With the tiny KL weights used in practice the
    variance ends up small anyway; starting small skips a long early phase in which unit-variance
    sampling noise drowns the latents (useful for short runs). Loaded checkpoints override it.
    """

    def __init__(self, ddconfig: Mapping, lossconfig: Mapping, embed_dim: int, ckpt_path: str | None = None,
                 ignore_keys: Sequence[str] = (), image_key: str = "image", colorize_nlabels: int | None = None,
                 monitor: str | None = None, use_ema: bool = False, ema_decay: float = 0.9999,
                 grad_clip: float | None = None, lr_warmup_steps: int = 0, lr_g_factor: float = 1.0,
                 scheduler_config: Mapping | None = None, batch_resize_range: Sequence[int] | None = None,
                 posterior_logvar_init: float | None = None, max_nonfinite_steps: int = 10):
        super().__init__(ddconfig, lossconfig, embed_dim, image_key=image_key, colorize_nlabels=colorize_nlabels,
                         monitor=monitor, use_ema=use_ema, ema_decay=ema_decay, grad_clip=grad_clip,
                         lr_warmup_steps=lr_warmup_steps, lr_g_factor=lr_g_factor, scheduler_config=scheduler_config,
                         batch_resize_range=batch_resize_range, max_nonfinite_steps=max_nonfinite_steps)
        if not ddconfig.get("double_z", True):
            raise ConfigError("AutoencoderKL: ddconfig.double_z must be true (the encoder outputs mean and logvar)")
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        if posterior_logvar_init is not None:
            with torch.no_grad():
                self.quant_conv.bias[embed_dim:].fill_(posterior_logvar_init)
        self._finish_init(ckpt_path, ignore_keys)

    def _autoencoder_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder, "quant_conv": self.quant_conv,
                "post_quant_conv": self.post_quant_conv}

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        moments = self.quant_conv(self.encoder(x))                 # (B, 2*embed_dim, H/f, W/f)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))               # (B, out_ch, H, W)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True):
        """(reconstruction, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def _reconstruct(self, x):
        """Sampled latents in training, the posterior mode otherwise; reg_loss = batch mean of the summed KL."""
        xrec, posterior = self(x, sample_posterior=self.training)
        return xrec, posterior.kl().mean(), {}

    def _extra_images(self, x):
        posterior = self.encode(x)
        return {"samples": self.decode(torch.randn_like(posterior.mean))}


class VQModel(AutoencoderBase):
    """Vector-quantised autoencoder: codebook of n_embed vectors of size embed_dim at (H/f, W/f).

    vq_legacy selects the CompVis beta placement (see VectorQuantizer); restart_unused_after the
    dead-code restart period in training forwards (None disables it).
    """

    def __init__(self, ddconfig: Mapping, lossconfig: Mapping, n_embed: int, embed_dim: int,
                 ckpt_path: str | None = None, ignore_keys: Sequence[str] = (), image_key: str = "image",
                 colorize_nlabels: int | None = None, monitor: str | None = None, remap: str | None = None,
                 sane_index_shape: bool = False, use_ema: bool = False, ema_decay: float = 0.9999,
                 lr_g_factor: float = 1.0, batch_resize_range: Sequence[int] | None = None,
                 scheduler_config: Mapping | None = None, grad_clip: float | None = None, lr_warmup_steps: int = 0,
                 beta: float = 0.25, vq_legacy: bool = True, restart_unused_after: int | None = 200,
                 max_nonfinite_steps: int = 10):
        super().__init__(ddconfig, lossconfig, embed_dim, image_key=image_key, colorize_nlabels=colorize_nlabels,
                         monitor=monitor, use_ema=use_ema, ema_decay=ema_decay, grad_clip=grad_clip,
                         lr_warmup_steps=lr_warmup_steps, lr_g_factor=lr_g_factor, scheduler_config=scheduler_config,
                         batch_resize_range=batch_resize_range, max_nonfinite_steps=max_nonfinite_steps)
        if ddconfig.get("double_z", False):
            raise ConfigError("VQModel: ddconfig.double_z must be false (the encoder outputs one latent)")
        z_channels = ddconfig["z_channels"]
        self.n_embed = n_embed
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=beta, remap=remap, sane_index_shape=sane_index_shape,
                                        legacy=vq_legacy, restart_unused_after=restart_unused_after)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        self._finish_init(ckpt_path, ignore_keys)

    def _autoencoder_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder, "quant_conv": self.quant_conv,
                "quantize": self.quantize, "post_quant_conv": self.post_quant_conv}

    def encode(self, x: torch.Tensor, return_pre_quant: bool = False):
        """(z_q, codebook loss, info); with return_pre_quant the latents before quantisation (B, embed_dim, h, w)."""
        h = self.quant_conv(self.encoder(x))                       # (B, embed_dim, H/f, W/f)
        return h if return_pre_quant else self.quantize(h)

    def decode_quantized(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))           # (B, out_ch, H, W)

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decode_quantized(quant)

    def decode_code(self, code: torch.Tensor) -> torch.Tensor:
        """Decode codebook indices (B, h, w)."""
        b, h, w = code.shape
        return self.decode_quantized(self.quantize.get_codebook_entry(code, (b, h, w, self.embed_dim)))

    def forward(self, x: torch.Tensor, return_pred_indices: bool = False):
        """(reconstruction, codebook loss) or, with return_pred_indices, also the code indices (CompVis)."""
        quant, diff, info = VQModel.encode(self, x)
        dec = self.decode_quantized(quant)
        return (dec, diff, info["indices"]) if return_pred_indices else (dec, diff)

    def _reconstruct(self, x):
        quant, qloss, info = VQModel.encode(self, x)
        xrec = self.decode_quantized(quant)
        return xrec, qloss, {"perplexity": info["perplexity"], "codebook_usage": info["usage"]}


class VQModelInterface(VQModel):
    """VQModel as a latent-diffusion first stage: encode gives pre-quantisation latents, decode quantises first."""

    def encode(self, x: torch.Tensor, return_pre_quant: bool = True):
        return super().encode(x, return_pre_quant=return_pre_quant)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decode_quantized(quant)

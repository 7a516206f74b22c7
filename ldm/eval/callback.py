"""Sample quality during training: FID / KID (/ IS) of a few samples against the validation images, per epoch.

    lightning:
      callbacks:
        sample_quality:
          target: ldm.eval.callback.SampleQuality
          params: {num_samples: 256, extractor: probe, every_n_epochs: 1, steps: 50}

At the end of a validation epoch (not the sanity check) every rank takes its share of `num_samples` items of
its validation loader, draws one sample under each item's condition (ldm.eval.generation.sample_like, EMA
weights, noise seeded with seed + item index) and feeds both to GenerativeMetrics; torchmetrics gathers the
features across ranks, so the logged `val/fid`, `val/kid_mean` (and `val/is_mean` when the extractor
classifies) cover all ranks' samples. The extractor lives in the callback, not in the model's checkpoint.
"""
from types import SimpleNamespace
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from ldm.eval.features import EXTRACTORS, build_feature_extractor
from ldm.eval.generation import first_items, sample_like
from ldm.eval.metrics import GenerativeMetrics
from ldm.diffusion.sampling import SAMPLERS, check_sampler, resolve_eta
from ldm.sampling_cli import schedule_for
from ldm.util import ConfigError


class SampleQuality(Callback):
    """Logs val/fid, val/kid_mean, val/kid_std (and val/is_mean) every `every_n_epochs` validation epochs."""

    def __init__(self, num_samples: int = 256, every_n_epochs: int = 1, extractor: str = "inception",
                 inception_weights: str | None = None, probe_cache: str | None = None, sampler: str = "ddim",
                 steps: int = 50, eta: float | None = None, guidance_scale: float = 1.0, seed: int = 0,
                 schedule: str | None = None):
        super().__init__()
        if extractor not in EXTRACTORS:
            raise ConfigError(f"SampleQuality.extractor={extractor!r}: choose one of {EXTRACTORS}")
        if sampler not in SAMPLERS:
            raise ConfigError(f"SampleQuality.sampler={sampler!r}: choose one of {SAMPLERS}")
        try:
            check_sampler(sampler, schedule_for(sampler, schedule))
            eta = resolve_eta(sampler, eta)
        except ValueError as err:
            raise ConfigError(f"SampleQuality (sampler={sampler!r}, schedule={schedule!r}, eta={eta}): {err}") from None
        if num_samples < 2 or every_n_epochs < 1:
            raise ConfigError(f"SampleQuality: num_samples must be >= 2 and every_n_epochs >= 1, got "
                              f"{num_samples} and {every_n_epochs}")
        self.num_samples, self.every_n_epochs, self.seed = num_samples, every_n_epochs, seed
        self.extractor_name, self.inception_weights, self.probe_cache = extractor, inception_weights, probe_cache
        self.sampling = SimpleNamespace(sampler=sampler, steps=steps, eta=eta, scale=guidance_scale, schedule=schedule)
        self.metrics: GenerativeMetrics | None = None

    def _metrics(self, device: torch.device) -> GenerativeMetrics:
        if self.metrics is None:  # built once, on first use: the probe may need training, Inception a file
            extractor = build_feature_extractor(self.extractor_name, self.inception_weights, self.probe_cache)
            self.metrics = GenerativeMetrics(extractor, kid_subset_size=self.num_samples)
        return self.metrics.to(device)

    def _due(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        metrics = self._metrics(pl_module.device)
        metrics.reset()
        share = -(-self.num_samples // trainer.world_size)            # this rank's part, rounded up
        first = self.seed + trainer.global_rank * share
        seen = 0
        for batch in first_items(_loader(trainer), share):
            real = pl_module.get_image(batch)                          # (B, C, H, W) in [-1, 1]
            metrics.update(real, real=True)
            metrics.update(sample_like(pl_module, batch, first + seen, self.sampling).to(real.device), real=False)
            seen += len(real)
        if seen < 2:
            raise ConfigError(f"SampleQuality: the validation loader gave {seen} image(s) on rank "
                              f"{trainer.global_rank}; it needs at least 2 (raise the validation length)")
        values = metrics.compute()
        pl_module.log_dict({f"val/{k}": float(v) for k, v in values.items() if k != "kid_subset_size"},
                           on_epoch=True, sync_dist=False, rank_zero_only=True)


def _loader(trainer: pl.Trainer) -> Any:
    loaders = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        raise ConfigError("SampleQuality needs a validation split in the data config (data.params.validation)")
    return loaders

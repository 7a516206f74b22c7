"""Lightning callbacks of main.py: run directory set-up, image grids, epoch stats, SIGUSR1 and atomic checkpoints."""
import glob
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_info
from torchvision.utils import make_grid

from ldm.checkpoint import CheckpointWriteError, save_checkpoint_atomic
from ldm.models.sharding import is_sharded
from ldm.rng import preserved_rng


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in the target folder, then `os.replace`d into place.

    A crash or a full disk mid-save never leaves a truncated `.ckpt`: the previous file (if any)
    stays intact. Loading defaults to `torch.load(weights_only=True)`. Remote (`scheme://`) paths
    fall back to Lightning's fsspec transaction.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = os.fspath(path)
        if storage_options is not None or "://" in path:
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            save_checkpoint_atomic(checkpoint, path)
        except OSError as err:  # a full disk, a lost mount: say what survived
            kept = "the previous file is intact" if os.path.exists(path) else "no earlier file existed"
            raise CheckpointWriteError(err.errno, f"could not write checkpoint {path} ({err.strerror or err}); "
                                                  f"{kept}") from err

    def load_checkpoint(self, path, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location, weights_only=True if weights_only is None else weights_only)


class SetupCallback(Callback):
    """Creates the run directory and saves the merged configs (global rank 0 only).

    On Ctrl+C during fit, saves `<ckptdir>/last.ckpt` so the run can be resumed with `-r` (not while the loss
    is non-finite: see `suspect`). Removes temporary files of checkpoints whose writing was cut short.
    """

    def __init__(self, now: str, logdir: str, ckptdir: str, cfgdir: str, config: dict, lightning_config: dict):
        self.now, self.logdir, self.ckptdir, self.cfgdir = now, logdir, ckptdir, cfgdir
        self.config, self.lightning_config = config, lightning_config

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        for folder in (self.logdir, self.ckptdir, self.cfgdir):
            os.makedirs(folder, exist_ok=True)
        for stale in sorted(glob.glob(os.path.join(glob.escape(self.ckptdir), ".*.tmp"))):
            rank_zero_info(f"Removing {stale}: a checkpoint that an earlier run did not finish writing")
            os.remove(stale)
        OmegaConf.save(OmegaConf.create(self.config), os.path.join(self.cfgdir, f"{self.now}-project.yaml"))
        OmegaConf.save(OmegaConf.create({"lightning": self.lightning_config}),
                       os.path.join(self.cfgdir, f"{self.now}-lightning.yaml"))
        rank_zero_info(f"Run directory: {self.logdir}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Every DDP rank of the foreground process group receives Ctrl+C, so all reach save_checkpoint's barrier.
        if isinstance(exception, KeyboardInterrupt) and trainer.state.fn == "fit" and not suspect(pl_module):
            path = os.path.join(self.ckptdir, "last.ckpt")
            rank_zero_info(f"Interrupted: saving {path}")
            trainer.save_checkpoint(path, weights_only=False)


class ImageLogger(Callback):
    """Saves `pl_module.log_images(batch, split=...)` as PNG grids (and to TensorBoard when it is the logger).

    Training: every `batch_frequency` global steps, and at steps 1, 2, 4, ... below it when
    `increase_log_steps`; `log_first_step` also logs the first batch of every fit (after a resume too).
    Validation: the first batch of each validation run. Files: `<trainer.default_root_dir>/images/
    {train,val}/<key>_gs-XXXXXX_e-XXXXXX_b-XXXXXX.png`. Values are expected in [-1, 1]: `clamp`
    clips to it, otherwise each grid is min-max rescaled (for latents, noise). Non-tensor entries
    (captions) and tensors that are not [N, 1|3, H, W] are skipped. Global rank 0 writes.
    """

    def __init__(self,
                 batch_frequency: int,                      # log every this many global steps
                 max_images: int = 4,                       # images per key
                 clamp: bool = True,
                 increase_log_steps: bool = True,           # also at 1, 2, 4, ... < batch_frequency
                 log_first_step: bool = False,
                 log_images_kwargs: Optional[dict] = None,  # passed on to pl_module.log_images
                 disabled: bool = False):
        if batch_frequency < 1:
            raise ValueError(f"ImageLogger: batch_frequency must be >= 1, got {batch_frequency}")
        self.batch_frequency, self.max_images, self.clamp = batch_frequency, max_images, clamp
        self.log_steps = {2 ** n for n in range(int(math.log2(batch_frequency)) + 1)} if increase_log_steps else set()
        self.log_first_step, self.disabled = log_first_step, disabled
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self._last_step, self._first_batch = -1, True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_batch = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        due = step % self.batch_frequency == 0 or step in self.log_steps or (self.log_first_step and self._first_batch)
        self._first_batch = False
        if due and step != self._last_step:  # gradient accumulation repeats a global step
            self._last_step = step
            self.log_images(trainer, pl_module, batch, batch_idx, "train")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and not trainer.sanity_checking:
            self.log_images(trainer, pl_module, batch, batch_idx, "val")

    def log_images(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                   split: str) -> None:
        """Run `log_images` in eval mode, without gradients, with a forked random state; write one grid per key.

        A sharded model (--strategy fsdp) samples on every rank (each forward needs all shards); rank 0 writes.
        """
        if self.disabled or not callable(getattr(pl_module, "log_images", None)):
            return
        if not trainer.is_global_zero and not is_sharded(pl_module):
            return
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.no_grad(), preserved_rng():  # logging leaves the training's random stream alone
                images = pl_module.log_images(batch, split=split, **self.log_images_kwargs)
        finally:
            for module, mode in modes.items():
                module.training = mode
        if not trainer.is_global_zero:
            return
        folder = os.path.join(trainer.default_root_dir, "images", split)
        os.makedirs(folder, exist_ok=True)
        step = trainer.global_step
        for key, value in images.items():
            if not (isinstance(value, torch.Tensor) and value.ndim == 4 and value.shape[1] in (1, 3)):
                continue
            grid = self.to_grid(value[:self.max_images])  # (C, H', W') in [0, 1]
            name = f"{key.replace('/', '_')}_gs-{step:06}_e-{trainer.current_epoch:06}_b-{batch_idx:06}.png"
            save_png(grid, os.path.join(folder, name))
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"{split}/{key}", grid, global_step=step)

    def to_grid(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> one (C, H', W') grid in [0, 1], 4 images per row."""
        x = images.detach().float().cpu()
        if self.clamp:
            x = (x.clamp(-1, 1) + 1) / 2
        else:
            x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
        return make_grid(x, nrow=4)


def save_png(grid: torch.Tensor, path: str) -> None:
    """(C, H, W) float in [0, 1] -> 8-bit PNG."""
    array = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (H, W, C)
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


class EpochStats(Callback):
    """Prints and logs each training epoch's wall time and, on CUDA, its peak allocated memory (max over ranks).

    An epoch resumed midway is timed from the start of the fit.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.time()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)
        self.start = time.time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = trainer.strategy.root_device
        stats = {"time/epoch_s": time.time() - self.start}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            stats["memory/peak_MiB"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        stats = {k: float(trainer.strategy.reduce(torch.tensor(v, device=device), reduce_op="max"))
                 for k, v in stats.items()}
        rank_zero_info(f"Epoch {trainer.current_epoch}: " + ", ".join(f"{k} {v:.2f}" for k, v in stats.items()))
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=trainer.global_step)


def suspect(pl_module: pl.LightningModule) -> bool:
    """True while the module's loss has been NaN/inf in the latest step(s) (`nonfinite_streak`,
    ldm.models.nonfinite): its weights may be corrupt, so no checkpoint replaces the last good one."""
    return getattr(pl_module, "nonfinite_streak", 0) > 0


class LastCheckpoint(Callback):
    """Keeps `ckpt_path` (`last.ckpt`) at the latest step, so `-r` continues where training stopped.

    Lightning 2's `ModelCheckpoint(save_last=True)` rewrites `last.ckpt` only when a top-k file was
    saved at the same step, so with a monitor it can lag far behind. This writes it (when
    `periodic`) after every training epoch and validation, every `every_n_train_steps` steps (0: never) and
    when training ends, and, where the platform has SIGUSR1 (not Windows), at the end of the batch during which
    SIGUSR1 arrived (SLURM's pre-emption warning). A SIGUSR1 handler already installed (Lightning's SLURM
    auto-requeue) still runs: ours calls it too. Under DDP a signal reaching one rank saves for all. Nothing
    is written while the loss is non-finite (`suspect`): the file keeps the last good step.

    `stop_on_signal` (a submitit job, `signum` its pre-emption signal): after that save every rank stops
    training (`stopped_by_signal`); the handler installed before fit (submitit's requeue) is left to the
    caller, which runs it once training has stopped.
    """

    def __init__(self, ckpt_path: str, periodic: bool = True,
                 signum: Optional[int] = getattr(signal, "SIGUSR1", None), every_n_train_steps: int = 0,
                 stop_on_signal: bool = False):
        if every_n_train_steps < 0:
            raise ValueError(f"LastCheckpoint: every_n_train_steps must be >= 0, got {every_n_train_steps}")
        self.ckpt_path, self.periodic, self.signum, self.stop_on_signal = ckpt_path, periodic, signum, stop_on_signal
        self.every_n_train_steps = every_n_train_steps
        self.requested, self.stopped_by_signal, self._saved_step = False, False, -1
        self._previous, self._installed = None, False

    def save(self, trainer: pl.Trainer, reason: str) -> None:
        if trainer.global_step == self._saved_step:
            return
        if suspect(trainer.lightning_module):
            rank_zero_info(f"Not saving {self.ckpt_path} at step {trainer.global_step} ({reason}): the loss is "
                           f"non-finite; it keeps step {self._saved_step}")
            return
        rank_zero_info(f"Saving {self.ckpt_path} at step {trainer.global_step} ({reason})")
        trainer.save_checkpoint(self.ckpt_path, weights_only=False)
        self._saved_step = trainer.global_step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._saved_step = trainer.global_step  # a resumed run starts from a saved step
        # After Lightning registered its own handlers (fit start), so it still installs its SLURM handler.
        if self.signum is not None and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handle)
            self._installed = True

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        if callable(self._previous) and not self.stop_on_signal:
            self._previous(signum, frame)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        requested = self.requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested:
            self.requested = False
            self.save(trainer, f"signal {self.signum}")
            if self.stop_on_signal:
                rank_zero_info(f"Stopping training at step {trainer.global_step} (signal {self.signum})")
                self.stopped_by_signal = trainer.should_stop = True
        elif self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self.save(trainer, f"every {self.every_n_train_steps} step(s)")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.periodic:
            self.save(trainer, "epoch end")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.periodic and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.save(trainer, "validation")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.periodic:
            self.save(trainer, "end of training")
        self._restore_handler()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self._installed and signal.getsignal(self.signum) == self._handle:
            signal.signal(self.signum, signal.SIG_DFL if self._previous is None else self._previous)
        self._installed = False

"""A tiny LightningModule and dataset for the main.py / callback tests (seconds on CPU)."""
import hashlib
import os
import signal
import time

import pytorch_lightning as pl
import torch
from torch import nn


class ToyImages(torch.utils.data.Dataset):
    """`length` random 3 x size x size images in [-1, 1] (fixed by `seed`), as {"image", "caption"}."""

    def __init__(self, length: int = 16, size: int = 8, seed: int = 0):
        self.images = torch.rand(length, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "caption": f"toy {i}"}


class ToyAutoencoder(pl.LightningModule):
    """A 1x1-conv bottleneck autoencoder with an LR scheduler, a monitor and `log_images`.

    `interrupt_at` raises KeyboardInterrupt and `signal_at` sends SIGUSR1 to this process in
    the training step of that global step (for the interruption tests); a missing `require_file`
    fails the construction (sweep retries).
    """

    def __init__(self, embed_dim: int = 2, monitor: str | None = "val/loss", interrupt_at: int = -1,
                 signal_at: int = -1, require_file: str | None = None):
        super().__init__()
        if require_file and not os.path.exists(require_file):
            raise RuntimeError(f"ToyAutoencoder: {require_file} does not exist (a run that fails on purpose)")
        self.save_hyperparameters()
        self.encoder, self.decoder = nn.Conv2d(3, embed_dim, 1), nn.Conv2d(embed_dim, 3, 1)
        if monitor:
            self.monitor = monitor
        self.learning_rate = 1e-3

    def on_train_start(self) -> None:
        print(f"[rank {self.global_rank}] logdir {self.trainer.default_root_dir}", flush=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))  # (B, 3, H, W)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.hparams.interrupt_at:
            raise KeyboardInterrupt
        if self.global_step == self.hparams.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        loss = (self(batch["image"]) - batch["image"]).abs().mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", (self(batch["image"]) - batch["image"]).abs().mean(), sync_dist=True)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.log("test/loss", (self(batch["image"]) - batch["image"]).abs().mean(), sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.learning_rate)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)]

    def log_images(self, batch: dict, split: str = "train") -> dict:
        x = batch["image"]
        return {"inputs": x, "reconstructions": self(x), "latents": self.encoder(x), "captions": batch["caption"]}


class RankState(pl.Callback):
    """Saves each rank's full state dict to `<folder>/rank<global rank>.pt` when training ends."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        os.makedirs(self.folder, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


class SlowSteps(pl.Callback):
    """Writes the global step to `step_file` after each batch and, while `marker` exists, sleeps `delay` seconds
    (so that a test can signal a training that is still running)."""

    def __init__(self, step_file: str, marker: str, delay: float = 0.5):
        self.step_file, self.marker, self.delay = step_file, marker, delay

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        with open(self.step_file, "w") as f:
            f.write(str(trainer.global_step))
        if os.path.exists(self.marker):
            time.sleep(self.delay)


class LossLog(pl.Callback):
    """Appends one line per training batch to `path`: global step, epoch, a digest of the batch's images and
    the exact bits (float.hex) of each logged metric in `keys` (for the bit-exact resume tests)."""

    def __init__(self, path: str, keys: list[str], image_key: str = "image"):
        self.path, self.keys, self.image_key = path, list(keys), image_key

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        digest = hashlib.sha1(batch[self.image_key].detach().cpu().numpy().tobytes()).hexdigest()[:12]
        values = [float(trainer.callback_metrics[k]).hex() if k in trainer.callback_metrics else "-"
                  for k in self.keys]
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {trainer.current_epoch} {digest} {' '.join(values)}\n")

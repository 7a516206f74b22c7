"""TrainingState: what a checkpoint needs beyond weights, optimizers and loop counters to resume bit for bit.

Saved with every checkpoint (under `callbacks`): the position in the training data (epoch and batches done in
it) and the random generators' states after the last completed training batch. Restoring hands the position
to the DataModule (`set_train_position`: the loader continues the epoch where the checkpoint left it) and puts
the generators back right before the next training batch, after everything that happens between a restore
and that batch (sanity check, loader start-up). Validation runs on the training stream's current state and
gives it back afterwards, so a resumed run that skips a validation the first run did sees the same draws.

Anything else that draws from the global generators between two training batches breaks the equality; such a
draw is reported once (a warning naming the batch). main.py puts this callback first, so its snapshot at the
end of a batch precedes the checkpoint written by any later callback at that batch.
"""
import warnings
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from ldm.rng import rng_state, same_rng_state, set_rng_state


class TrainingState(Callback):
    """Data position and RNG states in checkpoints; restores both on resume (see the module docstring).

    Under DDP the states of rank 0 are saved; every rank starts from the same seed (main.py) and draws alike.
    """

    def __init__(self) -> None:
        self.epoch, self.batches = 0, 0                  # batches completed in `epoch`
        self.rng: dict[str, Any] | None = None           # generators after the last completed batch
        self._restore: dict[str, Any] | None = None      # generators to set before the next batch
        self._validation_rng: dict[str, Any] | None = None
        self._warned = False
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    # ---- training -------------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch, self.batches = trainer.current_epoch, 0  # not called when a run resumes mid-epoch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._restore is not None:
            set_rng_state(self._restore)
            self._restore = None
        elif self.rng is not None and not self._warned and not same_rng_state(self.rng, rng_state()):
            self._warned = True
            rank_zero_warn(f"TrainingState: something drew random numbers between the end of a training batch "
                           f"and the start of batch {batch_idx} (epoch {trainer.current_epoch}) outside "
                           f"validation: a run resumed from a checkpoint here would not repeat those draws")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.epoch, self.batches = trainer.current_epoch, self.batches + 1
        self.rng = rng_state()

    # ---- validation leaves the training stream as it found it ------------------------------------------------
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._validation_rng = rng_state()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validation_rng is not None:
            set_rng_state(self._validation_rng)
            self._validation_rng = None

    # ---- checkpoint ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.batches, "rng": self.rng if self.rng is not None else rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch, self.batches = int(state_dict["epoch"]), int(state_dict["batches"])
        self.rng = self._restore = state_dict["rng"]
        datamodule = getattr(self._trainer, "datamodule", None)
        if callable(getattr(datamodule, "set_train_position", None)):
            datamodule.set_train_position(self.epoch, self.batches)
            rank_zero_info(f"TrainingState: resuming epoch {self.epoch} after its first {self.batches} batch(es)")
            # Lightning warns that a mid-epoch resume without a state_dict-carrying loader is unreliable; here
            # the position travels in this callback's state instead
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the "
                                                      "epoch ended")
        elif self.batches:
            rank_zero_warn(f"TrainingState: the data module {type(datamodule).__name__} has no set_train_position; "
                           f"epoch {self.epoch} restarts from its first batch instead of batch {self.batches}")


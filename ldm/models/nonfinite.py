"""NonFiniteGuard: skip training steps whose loss is NaN/inf; stop after `patience` of them in a row.

A skipped step changes no weight, optimizer moment or EMA. While a streak lasts the module reports it
(`nonfinite_streak`), and `ldm.callbacks.LastCheckpoint` writes nothing, so `last.ckpt` keeps the last good
step; the `patience`-th non-finite loss in a row raises NonFiniteLossError (main.py prints it and exits 1).
"""
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn


class NonFiniteLossError(RuntimeError):
    """Training stopped: the loss was NaN/inf in too many steps in a row."""


class NonFiniteGuard:
    """Counts consecutive non-finite losses of one Lightning module (the decision is taken over all ranks)."""

    def __init__(self, patience: int = 10):
        if patience < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {patience}")
        self.patience = patience
        self.streak, self.first_step = 0, -1

    def finite(self, module: pl.LightningModule, loss: torch.Tensor, name: str = "loss") -> bool:
        """True when `loss` is finite on every rank; otherwise warns (the step is to be skipped) and raises
        NonFiniteLossError at the `patience`-th such step in a row."""
        ok = bool(torch.isfinite(loss.detach()).all())
        trainer = module._trainer
        if trainer is not None and trainer.world_size > 1:
            ok = trainer.strategy.reduce_boolean_decision(ok, all=True)
        step = module.global_step
        if ok:
            self.streak = 0
            return True
        if self.streak == 0:
            self.first_step = step
        self.streak += 1
        if self.streak >= self.patience:
            raise NonFiniteLossError(
                f"training stopped at step {step}: the {name} was NaN/inf in {self.streak} steps in a row (from step "
                f"{self.first_step}; model.params.max_nonfinite_steps={self.patience}). Those steps were skipped and "
                f"no checkpoint was written during them: last.ckpt holds the last good step. Lower the learning rate, "
                f"clip gradients (grad_clip / lightning.trainer.gradient_clip_val) or check the data, then resume "
                f"with -r")
        rank_zero_warn(f"step {step}: the {name} is {float(loss.detach().float().mean())}; skipping this step "
                       f"({self.streak} in a row; training stops at {self.patience})")
        return False

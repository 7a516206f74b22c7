"""Exponential moving average of a model's trainable parameters (CompVis `LitEma` key layout)."""
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn as nn


class LitEma(nn.Module):
    """Shadow copy theta_ema <- theta_ema - (1 - d) * (theta_ema - theta) after each update.

    Buffers: `decay`, `num_updates` and one per trainable parameter named with its dots removed
    (`encoder.conv_in.weight` -> `encoderconv_inweight`), exactly as in CompVis checkpoints.
    With use_num_upates (CompVis spelling) the decay warms up: n is incremented first, then
    d = min(decay, (1 + n) / (10 + n)); otherwise d = decay and num_updates stays -1.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"LitEma: decay must be in [0, 1], got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        self.m_name2s_name: dict[str, str] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            s_name = name.replace(".", "")
            if s_name in self.m_name2s_name.values() or s_name in ("decay", "num_updates"):
                raise ValueError(f"LitEma: parameter {name!r} maps to the buffer name {s_name!r}, "
                                 f"which another parameter or an EMA buffer already uses")
            self.m_name2s_name[name] = s_name
            self.register_buffer(s_name, p.detach().clone().float())
        self.collected_params: list[torch.Tensor] = []

    def current_decay(self) -> float:
        """The decay the next update will use (after its num_updates increment)."""
        decay = float(self.decay)
        if int(self.num_updates) >= 0:
            n = int(self.num_updates) + 1
            decay = min(decay, (1 + n) / (10 + n))
        return decay

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update towards `model`'s current trainable parameters."""
        one_minus_decay = 1.0 - self.current_decay()
        if int(self.num_updates) >= 0:
            self.num_updates += 1
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name not in self.m_name2s_name:
                continue
            s = shadow[self.m_name2s_name[name]]
            s.sub_(one_minus_decay * (s - p.detach().to(s.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite `model`'s trainable parameters with the EMA values."""
        shadow = dict(self.named_buffers())
        named = dict(model.named_parameters())
        missing = [n for n in self.m_name2s_name if n not in named]
        if missing:
            raise KeyError(f"LitEma.copy_to: the model lacks EMA parameter(s) {missing[:5]}")
        for name, s_name in self.m_name2s_name.items():
            named[name].copy_(shadow[s_name])

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Save copies of `parameters` so `restore` can bring them back after `copy_to`."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the values saved by `store` (same parameters, same order)."""
        parameters = list(parameters)
        if len(parameters) != len(self.collected_params):
            raise RuntimeError(f"LitEma.restore: {len(parameters)} parameters given but {len(self.collected_params)} "
                               f"were stored (call store() with the same parameters first)")
        for saved, p in zip(self.collected_params, parameters):
            p.copy_(saved)
        self.collected_params = []


@contextmanager
def ema_scope(ema: LitEma | None, model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block `model` holds its EMA weights; the training weights come back on exit.

    A no-op when `ema` is None or not enabled.
    """
    if ema is None or not enabled:
        yield
        return
    tracked = [p for name, p in model.named_parameters() if name in ema.m_name2s_name]  # frozen ones never change
    ema.store(tracked)
    ema.copy_to(model)
    try:
        yield
    finally:
        ema.restore(tracked)

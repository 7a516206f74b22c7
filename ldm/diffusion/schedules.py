"""Beta schedules and the 12 DDPM schedule buffers (CompVis names), computed in float64.

A Lightning module registers `schedule_buffers(...)` with `register_buffer(name, tensor)` (so checkpoints
keep the CompVis keys) and hands `DiffusionSchedule.from_mapping(dict(self.named_buffers()))` to the
math and the samplers, which then follow the module's device.
"""
import math
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "sqrt_linear", "sqrt", "cosine")

# Names and order of the buffers in CompVis/SD checkpoints.
BUFFER_NAMES = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)


def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-4,
                       linear_end: float = 2e-2, cosine_s: float = 8e-3) -> Tensor:
    """Betas [n_timestep] in float64.

    "linear" is CompVis' scaled linear (linspace of the square roots, squared), "sqrt_linear" a plain
    linspace of betas, "sqrt" the square root of that linspace, "cosine" Nichol & Dhariwal (2021)
    with offset `cosine_s`, betas clipped to [0, 0.999].
    """
    if not isinstance(n_timestep, int) or n_timestep < 1:
        raise ValueError(f"make_beta_schedule: n_timestep must be a positive int, got {n_timestep!r}")
    f64 = dict(dtype=torch.float64)
    if schedule == "linear":
        return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, **f64) ** 2
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, n_timestep, **f64)
    if schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, n_timestep, **f64) ** 0.5
    if schedule == "cosine":
        s = torch.arange(n_timestep + 1, **f64) / n_timestep + cosine_s
        f = torch.cos(s / (1 + cosine_s) * math.pi / 2) ** 2  # alpha-bar up to a constant
        return (1 - f[1:] / f[:-1]).clamp(0, 0.999)
    raise ValueError(f"make_beta_schedule: unknown schedule {schedule!r}; choose one of {BETA_SCHEDULES}")


@dataclass(frozen=True, eq=False, repr=False)
class DiffusionSchedule:
    """The 12 CompVis schedule tensors, each [T], indexed by integer timestep t in [0, T)."""
    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    log_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor

    def __post_init__(self):
        n = self.betas.shape
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, Tensor) or value.dim() != 1 or value.shape != n:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"DiffusionSchedule.{f.name}: expected a 1-D tensor of shape "
                                 f"{tuple(n)} like betas, got {got}")

    def __repr__(self) -> str:
        b = self.betas
        return f"DiffusionSchedule(num_timesteps={len(b)}, dtype={b.dtype}, device={b.device})"

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def from_betas(cls, betas: Tensor | Sequence[float], v_posterior: float = 0.0) -> "DiffusionSchedule":
        """All buffers from betas; posterior variance = (1 - v_posterior) * beta-tilde + v_posterior * beta."""
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.dim() != 1 or len(betas) == 0:
            raise ValueError(f"given_betas: expected a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("given_betas: every beta must lie in (0, 1)")
        alphas = 1.0 - betas
        acp = torch.cumprod(alphas, dim=0)
        acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
        post_var = (1 - v_posterior) * betas * (1 - acp_prev) / (1 - acp) + v_posterior * betas
        return cls(
            betas=betas, alphas_cumprod=acp, alphas_cumprod_prev=acp_prev,
            sqrt_alphas_cumprod=acp.sqrt(), sqrt_one_minus_alphas_cumprod=(1 - acp).sqrt(),
            log_one_minus_alphas_cumprod=torch.log(1 - acp),
            sqrt_recip_alphas_cumprod=(1 / acp).sqrt(), sqrt_recipm1_alphas_cumprod=(1 / acp - 1).sqrt(),
            posterior_variance=post_var,
            posterior_log_variance_clipped=torch.log(post_var.clamp(min=1e-20)),
            posterior_mean_coef1=betas * acp_prev.sqrt() / (1 - acp),
            posterior_mean_coef2=(1 - acp_prev) * alphas.sqrt() / (1 - acp),
        )

    @classmethod
    def from_mapping(cls, tensors: Mapping[str, Tensor]) -> "DiffusionSchedule":
        """Pick the 12 buffers from any mapping (a state dict, `dict(module.named_buffers())`)."""
        missing = [name for name in BUFFER_NAMES if name not in tensors]
        if missing:
            raise KeyError(f"DiffusionSchedule.from_mapping: missing schedule buffer(s) {missing}")
        return cls(**{name: tensors[name] for name in BUFFER_NAMES})

    def buffers(self, dtype: Optional[torch.dtype] = torch.float32) -> "OrderedDict[str, Tensor]":
        """Ordered name -> tensor (float32 by default, as CompVis registers them; None keeps float64)."""
        return OrderedDict((name, getattr(self, name).to(dtype or getattr(self, name).dtype))
                           for name in BUFFER_NAMES)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "DiffusionSchedule":
        return DiffusionSchedule(**{name: getattr(self, name).to(device=device, dtype=dtype)
                                    for name in BUFFER_NAMES})


def make_schedule(beta_schedule: str = "linear", timesteps: int = 1000, linear_start: float = 1e-4,
                  linear_end: float = 2e-2, cosine_s: float = 8e-3, given_betas=None,
                  v_posterior: float = 0.0) -> DiffusionSchedule:
    """A float64 DiffusionSchedule from the CompVis DDPM arguments (`given_betas` overrides the rest)."""
    if given_betas is None:
        given_betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
    return DiffusionSchedule.from_betas(given_betas, v_posterior)


def schedule_buffers(beta_schedule: str = "linear", timesteps: int = 1000, linear_start: float = 1e-4,
                     linear_end: float = 2e-2, cosine_s: float = 8e-3, given_betas=None,
                     v_posterior: float = 0.0) -> "OrderedDict[str, Tensor]":
    """The 12 buffers as float32 tensors, in CompVis order, ready for `register_buffer`."""
    return make_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s,
                         given_betas, v_posterior).buffers(torch.float32)

"""Gaussian forward process q(x_t | x_0), its posterior q(x_{t-1} | x_t, x_0), and eps / x0 / v conversions.

With a_t = sqrt(alphas_cumprod[t]) and b_t = sqrt(1 - alphas_cumprod[t]):
x_t = a_t x0 + b_t eps,  v = a_t eps - b_t x0  (Salimans & Ho 2022).
Every function returns tensors on the device and dtype of its tensor inputs (x0 / x_t).
"""
from typing import Tuple

import torch
from torch import Tensor

from ldm.diffusion.schedules import DiffusionSchedule


def extract(a: Tensor, t: Tensor, x_shape) -> Tensor:
    """a[t] reshaped to [B, 1, ..., 1] to broadcast against x_shape; indexed on a's device, returned on t's."""
    if t.dim() != 1 or t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"extract: t must be an integer tensor of shape [B], got {t.dtype} {tuple(t.shape)}")
    out = a.gather(0, t.to(device=a.device, dtype=torch.int64))  # (B,)
    return out.to(t.device).reshape(len(t), *([1] * (len(x_shape) - 1)))


def _at(a: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """extract, cast to x's device and dtype so that no op promotes x to the schedule's dtype."""
    return extract(a, t, x.shape).to(device=x.device, dtype=x.dtype)


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, schedule: DiffusionSchedule) -> Tensor:
    """x_t = sqrt(alphas_cumprod) x0 + sqrt(1 - alphas_cumprod) noise."""
    return (_at(schedule.sqrt_alphas_cumprod, t, x0) * x0
            + _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def q_posterior(x0: Tensor, x_t: Tensor, t: Tensor,
                schedule: DiffusionSchedule) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0), each broadcastable to x_t."""
    mean = (_at(schedule.posterior_mean_coef1, t, x_t) * x0
            + _at(schedule.posterior_mean_coef2, t, x_t) * x_t)
    variance = _at(schedule.posterior_variance, t, x_t)
    log_variance = _at(schedule.posterior_log_variance_clipped, t, x_t)
    return mean, variance, log_variance


def predict_x0_from_eps(x_t: Tensor, t: Tensor, eps: Tensor, schedule: DiffusionSchedule) -> Tensor:
    """x0 = (x_t - b_t eps) / a_t."""
    return (_at(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _at(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)


def predict_eps_from_x0(x_t: Tensor, t: Tensor, x0: Tensor, schedule: DiffusionSchedule) -> Tensor:
    """eps = (x_t - a_t x0) / b_t."""
    return ((_at(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0)
            / _at(schedule.sqrt_recipm1_alphas_cumprod, t, x_t))


def predict_x0_from_v(x_t: Tensor, t: Tensor, v: Tensor, schedule: DiffusionSchedule) -> Tensor:
    """x0 = a_t x_t - b_t v."""
    return (_at(schedule.sqrt_alphas_cumprod, t, x_t) * x_t
            - _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v)


def predict_eps_from_v(x_t: Tensor, t: Tensor, v: Tensor, schedule: DiffusionSchedule) -> Tensor:
    """eps = a_t v + b_t x_t."""
    return (_at(schedule.sqrt_alphas_cumprod, t, x_t) * v
            + _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t)


def get_v(x0: Tensor, noise: Tensor, t: Tensor, schedule: DiffusionSchedule) -> Tensor:
    """v = a_t noise - b_t x0."""
    return (_at(schedule.sqrt_alphas_cumprod, t, x0) * noise
            - _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0)

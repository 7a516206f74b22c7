"""Plumbing shared by the samplers: initial noise, the denoiser call, inpainting blend, logging."""
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.diffusion import gaussian
from ldm.diffusion.parameterization import check_parameterization, to_eps_x0
from ldm.diffusion.schedules import DiffusionSchedule

Denoiser = Callable[..., Tensor]  # model(x, t, **cond) -> raw eps / x0 / v output, t a LongTensor [B]
StepCallback = Callable[[int, Tensor, Tensor], None]  # callback(i, x, x0_pred) after step i


def randn_like(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device, returned on x's device/dtype."""
    if generator is None:
        return torch.randn_like(x)
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return noise.to(x.device)


def initial_noise(shape_or_x_T: Sequence[int] | Tensor, schedule: DiffusionSchedule,
                  generator: Optional[torch.Generator]) -> Tensor:
    """x_T itself, or standard noise of the given shape on the schedule's device (default dtype)."""
    if isinstance(shape_or_x_T, Tensor):
        return shape_or_x_T
    like = torch.empty(tuple(shape_or_x_T), device=schedule.betas.device, dtype=torch.get_default_dtype())
    return randn_like(like, generator)


def check_inputs(x: Tensor, parameterization: str, mask: Optional[Tensor], x0: Optional[Tensor]) -> None:
    check_parameterization(parameterization)
    if (mask is None) != (x0 is None):
        raise ValueError("sampler: inpainting needs both `mask` (1 = known) and `x0` (the known content)")
    if x0 is not None and x0.shape != x.shape:
        raise ValueError(f"sampler: x0 shape {tuple(x0.shape)} differs from x_T shape {tuple(x.shape)}")


def timestep_batch(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)  # (B,)


def denoise(model: Denoiser, x: Tensor, t: int, schedule: DiffusionSchedule, parameterization: str,
            extra_args: Optional[Mapping[str, Any]], clip_denoised: bool) -> Tuple[Tensor, Tensor]:
    """(eps, x0) predicted at integer timestep t, x0 optionally clipped (see `clip_x0`)."""
    t_batch = timestep_batch(t, x)
    eps, x0 = to_eps_x0(parameterization, model(x, t_batch, **(extra_args or {})), x, t_batch, schedule)
    return clip_x0(x, t_batch, eps, x0, schedule) if clip_denoised else (eps, x0)


def clip_x0(x: Tensor, t_batch: Tensor, eps: Tensor, x0: Tensor,
            schedule: DiffusionSchedule) -> Tuple[Tensor, Tensor]:
    """x0 clamped to [-1, 1] and the eps consistent with it at (x, t)."""
    x0 = x0.clamp(-1.0, 1.0)
    return gaussian.predict_eps_from_x0(x, t_batch, x0, schedule), x0


def blend_known(x: Tensor, t: Optional[int], mask: Optional[Tensor], x0: Optional[Tensor],
                schedule: DiffusionSchedule, generator: Optional[torch.Generator]) -> Tensor:
    """Replace the known region (mask = 1) by x0 noised to timestep t (t None: x0 itself)."""
    if mask is None:
        return x
    known = x0.to(x)
    if t is not None:
        known = gaussian.q_sample(known, timestep_batch(t, x), randn_like(x, generator), schedule)
    mask = mask.to(x)
    return mask * known + (1 - mask) * x


def steps_iter(items: Sequence, progress: bool, desc: str) -> Iterable:
    return tqdm(items, desc=desc, total=len(items)) if progress else items


class Trace:
    """Calls the user callback after each step; keeps ~`keep` evenly spaced x0 predictions if asked."""

    def __init__(self, n_steps: int, callback: Optional[StepCallback], return_intermediates: bool,
                 keep: int = 10):
        self.callback, self.return_intermediates = callback, return_intermediates
        self.at = set(torch.linspace(0, n_steps - 1, min(n_steps, keep)).round().long().tolist())
        self.x0_preds: List[Tensor] = []

    def __call__(self, i: int, x: Tensor, x0_pred: Tensor) -> None:
        if self.callback is not None:
            self.callback(i, x, x0_pred)
        if self.return_intermediates and i in self.at:
            self.x0_preds.append(x0_pred)

    def result(self, x: Tensor):
        """x, or (x, list of x0 predictions) when intermediates were asked for."""
        return (x, self.x0_preds) if self.return_intermediates else x

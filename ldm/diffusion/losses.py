"""Diffusion training loss: L_simple, optional learned log-variance and ELBO (lvlb) weighting, as CompVis."""
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ldm.diffusion.parameterization import check_parameterization
from ldm.diffusion.schedules import DiffusionSchedule

LOSS_TYPES = ("l2", "l1")


def diffusion_loss(model_output: Tensor, target: Tensor, loss_type: str = "l2") -> Tensor:
    """Per-sample loss [B]: squared (l2) or absolute (l1) error, mean over all non-batch dims."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"diffusion_loss: unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if model_output.shape != target.shape:
        raise ValueError(f"diffusion_loss: model output {tuple(model_output.shape)} and target "
                         f"{tuple(target.shape)} differ in shape")
    err = model_output - target
    err = err.pow(2) if loss_type == "l2" else err.abs()
    return err.flatten(1).mean(dim=1)  # (B,)


def lvlb_weights(schedule: DiffusionSchedule, parameterization: str) -> Tensor:
    """Per-timestep weights [T] turning the squared error into the ELBO term L_{t-1}.

    L_{t-1} = ||mu_tilde(x_t, x0) - mu_theta||^2 / (2 sigma_t^2) with sigma_t^2 the posterior variance and
    mu_tilde = coef1 x0 + coef2 x_t, so the x0 weight is coef1^2 / (2 sigma_t^2); eps and v follow from
    x0 = (x_t - b eps) / a and x0 = a x_t - b v. t = 0 (sigma_0 = 0) copies the weight of t = 1.
    (CompVis' x0 weight has an operator-precedence slip and its v weight is all ones; not repeated here.)
    """
    check_parameterization(parameterization)
    if schedule.num_timesteps < 2:
        raise ValueError("lvlb_weights: need at least 2 timesteps")
    acp = schedule.alphas_cumprod
    x0_weight = schedule.posterior_mean_coef1 ** 2 / (2 * schedule.posterior_variance)
    scale = {"x0": torch.ones_like(acp), "eps": (1 - acp) / acp, "v": 1 - acp}[parameterization]
    weights = x0_weight * scale
    weights[0] = weights[1]
    return weights


def training_loss(model_output: Tensor, target: Tensor, t: Tensor, loss_type: str = "l2",
                  logvar: Optional[Tensor] = None, l_simple_weight: float = 1.0,
                  original_elbo_weight: float = 0.0,
                  lvlb_weights: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Scalar loss and its logged parts (loss_simple, loss_gamma, loss_vlb, loss).

    loss = l_simple_weight * mean(L / exp(logvar[t]) + logvar[t]) + original_elbo_weight * mean(w[t] L)
    with L the per-sample `diffusion_loss`; `logvar` [T] (learned or fixed) defaults to zeros.
    """
    per_sample = diffusion_loss(model_output, target, loss_type)  # (B,)
    logs = {"loss_simple": per_sample.mean().detach()}
    loss = per_sample
    if logvar is not None:
        logvar_t = logvar[t.to(logvar.device)].to(per_sample.device)  # (B,)
        loss = per_sample / torch.exp(logvar_t) + logvar_t
        logs["loss_gamma"] = loss.mean().detach()
    loss = l_simple_weight * loss.mean()
    if original_elbo_weight != 0:
        if lvlb_weights is None:
            raise ValueError("training_loss: original_elbo_weight != 0 needs lvlb_weights (see lvlb_weights())")
        w_t = lvlb_weights[t.to(lvlb_weights.device)].to(per_sample)  # (B,)
        loss_vlb = (w_t * per_sample).mean()
        logs["loss_vlb"] = loss_vlb.detach()
        loss = loss + original_elbo_weight * loss_vlb
    logs["loss"] = loss.detach()
    return loss, logs

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


def min_snr_weights(alphas_cumprod: Tensor, gamma: float, parameterization: str) -> Tensor:
    """Per-timestep min-SNR-gamma weights [T] (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy"): the x0-space weight min(SNR_t, gamma), expressed for the model's own target.

    With SNR = a / (1 - a), a = alphas_cumprod: an x0 error weighs SNR times an eps error and SNR + 1 times a
    v error, so the weights are min(SNR, gamma) / SNR (eps), min(SNR, gamma) / (SNR + 1) (v), min(SNR, gamma) (x0).
    Low-noise steps, which plain L_simple over-weighs, are capped; training reaches good samples in fewer steps.
    """
    check_parameterization(parameterization)
    if not gamma > 0:
        raise ValueError(f"min_snr_weights: gamma must be > 0, got {gamma}")
    snr = alphas_cumprod / (1 - alphas_cumprod)
    capped = snr.clamp(max=gamma)
    return {"eps": capped / snr, "v": capped / (snr + 1), "x0": capped}[parameterization]


def training_loss(model_output: Tensor, target: Tensor, t: Tensor, loss_type: str = "l2",
                  logvar: Optional[Tensor] = None, l_simple_weight: float = 1.0,
                  original_elbo_weight: float = 0.0, lvlb_weights: Optional[Tensor] = None,
                  snr_weights: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Scalar loss and its logged parts (loss_simple, loss_gamma, loss_vlb, loss).

    loss = l_simple_weight * mean(L / exp(logvar[t]) + logvar[t]) + original_elbo_weight * mean(w[t] L)
    with L the per-sample `diffusion_loss`, multiplied by `snr_weights[t]` (`min_snr_weights`) when given;
    `logvar` [T] (learned or fixed) defaults to zeros. loss_simple is always the unweighted mean of L.
    """
    per_sample = diffusion_loss(model_output, target, loss_type)  # (B,)
    logs = {"loss_simple": per_sample.mean().detach()}
    loss = per_sample
    if snr_weights is not None:
        loss = snr_weights[t.to(snr_weights.device)].to(per_sample) * per_sample
    if logvar is not None:
        logvar_t = logvar[t.to(logvar.device)].to(per_sample.device)  # (B,)
        loss = loss / torch.exp(logvar_t) + logvar_t
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

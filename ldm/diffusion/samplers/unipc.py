"""UniPC (Zhao et al. 2023): multistep predictor UniP and corrector UniC in data prediction, variant bh2
(B(h) = e^h - 1; "bh1": B(h) = h), written in lambda = -log sigma on x = x0 + sigma eps.

Each step: D at the new point; UniC corrects that point with D (the network is not called again at the
corrected point); UniP of order p (2 by default, or 3) predicts the next point from the last p D's. The first
steps warm up (order = steps done + 1), and with lower_order_final the order also drops to the number of steps
left (so the last step, to sigma = 0, returns D). The final point is not corrected. This is the algorithm of
diffusers' UniPCMultistepScheduler with predict_x0, solver_type bh2, no disabled corrector steps.
"""
import math
from typing import Any, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ldm.diffusion.samplers.sigma_common import SigmaCallback, check_sigmas, denoised_at

VARIANTS = ("bh1", "bh2")


def unipc_coefficients(h: float, rks: Sequence[float], variant: str):
    """(R, b, B(h), h phi_1): the order conditions R rho = b of UniPC for ratios rks (the last one 1)."""
    hh = -h
    h_phi_1 = math.expm1(hh)                              # e^{-h} - 1
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rows, b, factorial = [], [], 1
    for k in range(1, len(rks) + 1):
        rows.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.tensor(rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), b_h, h_phi_1


def _differences(history: List[Tensor], lambdas: List[float], h: float, order: int):
    """(ratios r_k = (lambda_k - lambda_0) / h, then 1; (D_k - D_0) / r_k) for the order - 1 points before the
    newest (D_0 = history[-1] at lambda_0 = lambdas[-1])."""
    rks, diffs = [], []
    for k in range(1, order):
        rk = (lambdas[-1 - k] - lambdas[-1]) / h
        rks.append(rk)
        diffs.append((history[-1 - k] - history[-1]) / rk)
    return rks + [1.0], diffs


def _combine(rhos: Tensor, diffs: List[Tensor], like: Tensor) -> Tensor:
    out = torch.zeros_like(like)
    for rho, d in zip(rhos.tolist(), diffs):
        out = out + rho * d
    return out


def unipc_predict(x: Tensor, history: List[Tensor], lambdas: List[float], s: float, s_next: float, order: int,
                  variant: str) -> Tensor:
    """UniP-order: x at sigma_next from x at sigma and the last `order` D's (history[-1] is D at sigma)."""
    h = math.log(s / s_next)
    rks, diffs = _differences(history, lambdas, h, order)
    R, b, b_h, h_phi_1 = unipc_coefficients(h, rks, variant)
    x_next = (s_next / s) * x - h_phi_1 * history[-1]
    if not diffs:
        return x_next
    rhos = torch.tensor([0.5], dtype=torch.float64) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
    return x_next - b_h * _combine(rhos, diffs, x)


def unipc_correct(x_prev: Tensor, x: Tensor, denoised: Tensor, history: List[Tensor], lambdas: List[float],
                  s_prev: float, s: float, order: int, variant: str) -> Tensor:
    """UniC-order: x (predicted at sigma from x_prev at s_prev) corrected with D at x; history[-1] is D at s_prev."""
    h = math.log(s_prev / s)
    rks, diffs = _differences(history, lambdas, h, order)
    R, b, b_h, h_phi_1 = unipc_coefficients(h, rks, variant)
    rhos = torch.tensor([0.5], dtype=torch.float64) if order == 1 else torch.linalg.solve(R, b)
    x_corr = (s / s_prev) * x_prev - h_phi_1 * history[-1]
    res = _combine(rhos[:-1], diffs, x) + rhos[-1].item() * (denoised - history[-1])
    return x_corr - b_h * res


@torch.no_grad()
def sample_unipc(denoiser, x: Tensor, sigmas: Tensor, extra_args: Optional[Mapping[str, Any]] = None,
                 callback: Optional[SigmaCallback] = None, generator: Optional[torch.Generator] = None,
                 order: int = 2, variant: str = "bh2", lower_order_final: bool = True) -> Tensor:
    """UniPC-`variant` of order 2 or 3 with the corrector; one denoiser call per step."""
    if order not in (1, 2, 3) or variant not in VARIANTS:
        raise ValueError(f"sample_unipc: order must be 1, 2 or 3 and variant one of {VARIANTS}; "
                         f"got {order}, {variant!r}")
    sigmas = check_sigmas(sigmas, x)
    n = len(sigmas) - 1
    history: List[Tensor] = []
    lambdas: List[float] = []
    x_prev, last_order = None, 0
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = denoised_at(denoiser, x, s, extra_args)
        if x_prev is not None:
            x = unipc_correct(x_prev, x, denoised, history, lambdas, sigmas[i - 1], s, last_order, variant)
        history, lambdas = (history + [denoised])[-order:], (lambdas + [-math.log(s)])[-order:]
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, i + 1)
        if s_next == 0:
            this_order = 1  # the higher-order terms vanish there; x_next = D
        x_prev, last_order = x, this_order
        x = denoised if s_next == 0 else unipc_predict(x, history, lambdas, s, s_next, this_order, variant)
        if callback is not None:
            callback(i, x, denoised)
    return x

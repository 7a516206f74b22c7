"""Blur kernels of the Real-ESRGAN degradation model (Wang et al. 2021, sec. 3.1), as torch tensors.

Every kernel is a (k, k) float32 tensor summing to 1, k odd, centred on pixel (k // 2, k // 2). With
Q(x) = x^T Sigma^-1 x, Sigma = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T:

    gaussian             exp(-Q / 2)
    generalized gaussian exp(-Q^beta / 2)       beta < 1: heavier tails, beta > 1: flatter top
    plateau              1 / (1 + Q^beta)
    sinc (circular low-pass, ringing/overshoot)  omega_c J1(omega_c r) / (2 pi r), omega_c^2 / (4 pi) at r = 0

`random_blur_kernel` draws one kernel the way Real-ESRGAN / StableSR do; `random_sinc_kernel` the final
sinc filter. Randomness comes only from the torch.Generator passed in.
"""
import math
from typing import Sequence

import torch
from torch import Tensor

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
KERNEL_SIZES = tuple(range(7, 22, 2))   # odd sizes 7..21, drawn uniformly
PADDED_SIZE = 21                        # every random kernel is zero-padded to this size


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    """One float drawn uniformly from [low, high)."""
    return low + (high - low) * torch.rand((), generator=generator, device=generator.device).item()


def choice(generator: torch.Generator, probs: Sequence[float]) -> int:
    """Index i drawn with probability probs[i] (probabilities need not be normalised)."""
    weights = torch.as_tensor(probs, dtype=torch.float64, device=generator.device)
    return int(torch.multinomial(weights, 1, generator=generator).item())


def _grid(size: int) -> tuple[Tensor, Tensor]:
    """(size, size) coordinates x (columns), y (rows), 0 at the centre."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"blur kernel size must be a positive odd integer, got {size}")
    r = torch.arange(size, dtype=torch.float64) - size // 2
    return r[None, :].expand(size, size), r[:, None].expand(size, size)


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> Tensor:
    """Q(x) = x^T Sigma^-1 x on the kernel grid, Sigma rotated by theta (radians)."""
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"blur sigmas must be positive, got {sigma_x}, {sigma_y}")
    x, y = _grid(size)
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * x + s * y, -s * x + c * y            # coordinates along the rotated principal axes
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def _normalised(kernel: Tensor) -> Tensor:
    return (kernel / kernel.sum()).to(torch.float32)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0) -> Tensor:
    """Bivariate Gaussian exp(-Q/2), normalised; sigma_y None = isotropic."""
    q = _quadratic_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, theta)
    return _normalised(torch.exp(-0.5 * q))


def generalized_gaussian_kernel(size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0,
                                beta: float = 1.0) -> Tensor:
    """exp(-Q^beta / 2), normalised; beta = 1 is the Gaussian."""
    q = _quadratic_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, theta)
    return _normalised(torch.exp(-0.5 * q ** beta))


def plateau_kernel(size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0,
                   beta: float = 1.0) -> Tensor:
    """1 / (1 + Q^beta), normalised: a flat top with polynomial tails."""
    q = _quadratic_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, theta)
    return _normalised(1.0 / (1.0 + q ** beta))


def sinc_kernel(size: int, omega_c: float) -> Tensor:
    """Circular ideal low-pass with cut-off omega_c (radians per pixel), truncated to size x size, normalised."""
    if not 0 < omega_c <= math.pi:
        raise ValueError(f"sinc cut-off omega_c must lie in (0, pi], got {omega_c}")
    x, y = _grid(size)
    r = torch.sqrt(x ** 2 + y ** 2)
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    kernel = omega_c * torch.special.bessel_j1(omega_c * safe_r) / (2 * math.pi * safe_r)
    kernel = torch.where(r > 0, kernel, torch.full_like(r, omega_c ** 2 / (4 * math.pi)))
    return _normalised(kernel)


def pad_kernel(kernel: Tensor, size: int = PADDED_SIZE) -> Tensor:
    """Zero-pad an odd (k, k) kernel to (size, size), keeping its centre."""
    k = kernel.shape[-1]
    if k > size or (size - k) % 2:
        raise ValueError(f"cannot pad a {k}x{k} kernel to {size}x{size} (needs an odd size >= {k})")
    p = (size - k) // 2
    return torch.nn.functional.pad(kernel, (p, p, p, p))


def _beta(generator: torch.Generator, beta_range: Sequence[float]) -> float:
    """Half the draws below 1, half above (Real-ESRGAN): uniform in [lo, 1) or [1, hi)."""
    lo, hi = beta_range
    return uniform(generator, lo, 1.0) if uniform(generator, 0.0, 1.0) < 0.5 else uniform(generator, 1.0, hi)


def mixed_kernel(generator: torch.Generator, size: int, kernel_list: Sequence[str], kernel_prob: Sequence[float],
                 sigma_range: Sequence[float], betag_range: Sequence[float],
                 betap_range: Sequence[float]) -> Tensor:
    """One (size, size) kernel of a type drawn from `kernel_list` with `kernel_prob`; sigmas uniform in
    `sigma_range` (isotropic types: one sigma, angle 0; anisotropic: two sigmas, angle uniform in [-pi, pi])."""
    if len(kernel_list) != len(kernel_prob):
        raise ValueError(f"kernel_list has {len(kernel_list)} entries but kernel_prob {len(kernel_prob)}")
    name = kernel_list[choice(generator, kernel_prob)]
    if name not in KERNEL_TYPES:
        raise ValueError(f"unknown blur kernel type {name!r}; known: {', '.join(KERNEL_TYPES)}")
    sigma_x = uniform(generator, *sigma_range)
    sigma_y, theta = sigma_x, 0.0
    if name.endswith("aniso"):
        sigma_y, theta = uniform(generator, *sigma_range), uniform(generator, -math.pi, math.pi)
    if name.startswith("generalized"):
        return generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, _beta(generator, betag_range))
    if name.startswith("plateau"):
        return plateau_kernel(size, sigma_x, sigma_y, theta, _beta(generator, betap_range))
    return gaussian_kernel(size, sigma_x, sigma_y, theta)


def random_blur_kernel(generator: torch.Generator, kernel_list: Sequence[str], kernel_prob: Sequence[float],
                       sigma_range: Sequence[float], betag_range: Sequence[float], betap_range: Sequence[float],
                       sinc_prob: float, sizes: Sequence[int] = KERNEL_SIZES) -> Tensor:
    """A (21, 21) kernel: with probability sinc_prob a sinc (omega_c uniform in [pi/3, pi] for sizes < 13,
    else [pi/5, pi]), otherwise `mixed_kernel`; the size is drawn uniformly from `sizes`."""
    size = int(sizes[choice(generator, [1.0] * len(sizes))])
    if uniform(generator, 0.0, 1.0) < sinc_prob:
        low = math.pi / 3 if size < 13 else math.pi / 5
        kernel = sinc_kernel(size, uniform(generator, low, math.pi))
    else:
        kernel = mixed_kernel(generator, size, kernel_list, kernel_prob, sigma_range, betag_range, betap_range)
    return pad_kernel(kernel)


def random_sinc_kernel(generator: torch.Generator, sizes: Sequence[int] = KERNEL_SIZES) -> Tensor:
    """The final sinc filter: size uniform in `sizes`, omega_c uniform in [pi/3, pi], padded to (21, 21)."""
    size = int(sizes[choice(generator, [1.0] * len(sizes))])
    return pad_kernel(sinc_kernel(size, uniform(generator, math.pi / 3, math.pi)))


def identity_kernel(size: int = PADDED_SIZE) -> Tensor:
    """A (size, size) pulse: filtering with it leaves the image unchanged."""
    kernel = torch.zeros(size, size)
    kernel[size // 2, size // 2] = 1.0
    return kernel

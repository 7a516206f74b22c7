"""Colour correction of a super-resolved image against its low-resolution input (StableSR, after decoding).

Diffusion SR keeps the LR picture's structure but may shift its colours; both fixes put the LR's colours
back while keeping the SR's detail. The LR is first resized (bicubic) to the SR's size, as StableSR's
scripts compare with the upsampled LR input.

    adain    per image and channel, the SR's mean and std are replaced by the LR's:
             (sr - mu_sr) / s_sr * s_lr + mu_lr, with s = sqrt(unbiased variance + eps)
    wavelet  a trous ("with holes") decomposition, 5 levels: blur with [1, 2, 1] x [1, 2, 1] / 16 dilated by
             1, 2, 4, 8, 16, replicate padding; the SR's high bands plus the LR's lowest band

Both are linear in the pixel values, so they work for [-1, 1] and [0, 1] images alike.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("adain", "wavelet", "none")
WAVELET_LEVELS = 5


def _batched(x: Tensor, name: str) -> Tensor:
    if x.ndim == 3:
        return x[None]
    if x.ndim != 4:
        raise ValueError(f"colorfix: {name} must be (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    return x


def match_lr(sr: Tensor, lr: Tensor) -> tuple[Tensor, Tensor]:
    """Both as (B, C, H, W), the LR bicubic-resized to the SR's size; a channel or batch mismatch is an error."""
    sr, lr = _batched(sr, "sr"), _batched(lr, "lr")
    if sr.shape[:2] != lr.shape[:2]:
        raise ValueError(f"colorfix: sr {tuple(sr.shape)} and lr {tuple(lr.shape)} differ in batch or channels "
                         f"(pass RGB images, not latents or RGBA)")
    if lr.shape[-2:] != sr.shape[-2:]:
        lr = F.interpolate(lr.to(sr.dtype), size=sr.shape[-2:], mode="bicubic", align_corners=False)
    return sr, lr.to(sr.dtype)


def channel_stats(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Per image and channel mean and sqrt(unbiased variance + eps), each (B, C, 1, 1)."""
    flat = x.flatten(2)                                                   # (B, C, H*W)
    mean = flat.mean(-1)[..., None, None]
    std = (flat.var(-1, unbiased=True) + eps).sqrt()[..., None, None]
    return mean, std


def adain_color_fix(sr: Tensor, lr: Tensor, eps: float = 1e-5) -> Tensor:
    """The SR with each channel's mean and std replaced by the (upsampled) LR's."""
    shape = sr.shape
    sr, lr = match_lr(sr, lr)
    mu_sr, sd_sr = channel_stats(sr, eps)
    mu_lr, sd_lr = channel_stats(lr, eps)
    return ((sr - mu_sr) / sd_sr * sd_lr + mu_lr).reshape(shape)


def wavelet_blur(x: Tensor, dilation: int) -> Tensor:
    """Depthwise [1, 2, 1] x [1, 2, 1] / 16 blur with holes of `dilation` pixels, replicate padding."""
    c = x.shape[1]
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (torch.outer(k1, k1) / 16.0).expand(c, 1, 3, 3)              # (C, 1, 3, 3)
    x = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(x, kernel, dilation=dilation, groups=c)


def wavelet_decompose(x: Tensor, levels: int = WAVELET_LEVELS) -> tuple[Tensor, Tensor]:
    """(high, low): low = the image blurred at dilations 1, 2, ..., 2^(levels-1); high = the sum of the detail
    bands = x - low, so high + low == x."""
    high, low = torch.zeros_like(x), x
    for i in range(levels):
        blurred = wavelet_blur(low, 2 ** i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(sr: Tensor, lr: Tensor, levels: int = WAVELET_LEVELS) -> Tensor:
    """The SR's high-frequency bands on the (upsampled) LR's low-frequency band."""
    shape = sr.shape
    sr, lr = match_lr(sr, lr)
    high, _ = wavelet_decompose(sr, levels)
    _, low = wavelet_decompose(lr, levels)
    return (high + low).reshape(shape)


def colorfix(sr: Tensor, lr: Tensor, mode: str = "adain") -> Tensor:
    """Correct `sr`'s colours against `lr` (any size; resized to the SR's): "adain", "wavelet" or "none"
    (StableSR's `nofix`)."""
    if mode in ("none", "nofix"):
        return sr
    if mode == "adain":
        return adain_color_fix(sr, lr)
    if mode == "wavelet":
        return wavelet_color_fix(sr, lr)
    raise ValueError(f"colorfix: mode must be one of {', '.join(MODES)}, got {mode!r}")

"""Real-ESRGAN second-order degradations (Wang et al. 2021), on tensors, reproducible under a torch.Generator.

Images are float (B, 3, H, W) in [0, 1]. The pure operations (`blur`, `resize`, `add_gaussian_noise`,
`add_poisson_noise`, `jpeg`, `usm_sharpen`) take every parameter explicitly; `degrade` draws the parameters
from a `DegradationConfig` and applies, per image, the order of Real-ESRGAN / StableSR training:

    1. blur (kernel 1)        2. resize x U(range)      3. noise (Gaussian or Poisson, maybe grey)   4. JPEG
    5. blur (kernel 2, prob)  6. resize to (H/s, W/s) x U(range2)                 7. noise
    8. 50/50: [resize to (H/s, W/s) -> final sinc -> JPEG] or [JPEG -> resize -> final sinc]
    9. clamp, quantise to 8 bits

The config fields carry Real-ESRGAN's names, so the values of a Real-ESRGAN or StableSR YAML can be copied
over. Defaults are StableSR's training configuration (`v2-finetune_text_T_512.yaml`, milder than Real-ESRGAN);
`DegradationConfig.preset("realesrgan")` gives Real-ESRGAN's x4plus values. Libraries: kornia (filtering,
Gaussian blur, grey conversion), torchvision (a real libjpeg codec; not differentiable, like StableSR's use).
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.filters import filter2d, gaussian_blur2d
from torch import Tensor
from torchvision.io import decode_jpeg, encode_jpeg

from ldm.data.blur_kernels import (KERNEL_TYPES, choice, identity_kernel, random_blur_kernel, random_sinc_kernel,
                                   uniform)

RESIZE_MODES = ("area", "bilinear", "bicubic")
MIXED_PROBS = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
PerImage = float | Sequence[float] | Tensor   # one value for the whole batch, or one per image


@dataclass(frozen=True)
class DegradationConfig:
    """Parameter ranges of the two degradation rounds (noise sigmas in 8-bit levels, i.e. /255)."""
    # round 1
    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = MIXED_PROBS
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 1.5)
    betag_range: tuple[float, float] = (0.5, 2.0)
    betap_range: tuple[float, float] = (1.0, 1.5)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)      # up, down, keep
    resize_range: tuple[float, float] = (0.3, 1.5)                  # down U(lo, 1), up U(1, hi)
    gaussian_noise_prob: float = 0.5                                # else Poisson
    noise_range: tuple[float, float] = (1.0, 15.0)
    poisson_scale_range: tuple[float, float] = (0.05, 2.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (60.0, 95.0)
    # round 2
    second_blur_prob: float = 0.5
    kernel_list2: tuple[str, ...] = KERNEL_TYPES
    kernel_prob2: tuple[float, ...] = MIXED_PROBS
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.0)
    betag_range2: tuple[float, float] = (0.5, 2.0)
    betap_range2: tuple[float, float] = (1.0, 1.5)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.6, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 12.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 1.0)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (60.0, 100.0)
    final_sinc_prob: float = 0.8
    resize_modes: tuple[str, ...] = RESIZE_MODES

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, f.name, tuple(value))
        self._check()

    def _check(self) -> None:
        for name in ("blur_sigma", "betag_range", "betap_range", "resize_range", "noise_range", "poisson_scale_range",
                     "jpeg_range", "blur_sigma2", "betag_range2", "betap_range2", "resize_range2", "noise_range2",
                     "poisson_scale_range2", "jpeg_range2"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"DegradationConfig.{name} must be [low, high] with 0 <= low <= high, got {[lo, hi]}")
        for name in ("jpeg_range", "jpeg_range2"):
            if not (1 <= getattr(self, name)[0] and getattr(self, name)[1] <= 100):
                raise ValueError(f"DegradationConfig.{name}: JPEG qualities lie in [1, 100], got {getattr(self, name)}")
        for name in ("resize_range", "resize_range2"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= 1 <= hi:
                raise ValueError(f"DegradationConfig.{name} must satisfy 0 < low <= 1 <= high, got {[lo, hi]}")
        for names in (("kernel_list", "kernel_prob"), ("kernel_list2", "kernel_prob2")):
            kinds, probs = (getattr(self, n) for n in names)
            if unknown := [k for k in kinds if k not in KERNEL_TYPES]:
                raise ValueError(f"DegradationConfig.{names[0]}: unknown kernel types {unknown}; known {KERNEL_TYPES}")
            if len(kinds) != len(probs) or not kinds:
                raise ValueError(f"DegradationConfig.{names[1]} needs one probability per entry of {names[0]}")
        for name in ("resize_prob", "resize_prob2"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"DegradationConfig.{name} must be [up, down, keep], got {getattr(self, name)}")
        if unknown := [m for m in self.resize_modes if m not in RESIZE_MODES]:
            raise ValueError(f"DegradationConfig.resize_modes: unknown {unknown}; known {RESIZE_MODES}")

    @classmethod
    def preset(cls, name: str) -> "DegradationConfig":
        """"stablesr" (the defaults) or "realesrgan" (Real-ESRGAN x4plus: stronger blur, noise and JPEG)."""
        if name not in PRESETS:
            raise ValueError(f"unknown degradation preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_any(cls, spec: "DegradationConfig | str | Mapping[str, Any] | None") -> "DegradationConfig":
        """None -> StableSR defaults; a preset name; or a mapping of fields, optionally with `preset: name` as base."""
        if spec is None or isinstance(spec, cls):
            return spec or cls()
        if isinstance(spec, str):
            return cls.preset(spec)
        if not isinstance(spec, Mapping):
            raise TypeError(f"degradation must be a DegradationConfig, a preset name or a mapping, got {type(spec)}")
        fields = dict(spec)
        base = dataclasses.asdict(cls.preset(fields.pop("preset", "stablesr")))
        if unknown := sorted(set(fields) - set(base)):
            raise ValueError(f"unknown degradation keys {unknown}; known: {', '.join(sorted(base))}")
        return cls(**{**base, **fields})


PRESETS: dict[str, dict[str, Any]] = {
    "stablesr": {},
    "realesrgan": dict(blur_sigma=(0.2, 3.0), betag_range=(0.5, 4.0), betap_range=(1.0, 2.0),
                       resize_range=(0.15, 1.5), noise_range=(1.0, 30.0), poisson_scale_range=(0.05, 3.0),
                       jpeg_range=(30.0, 95.0), second_blur_prob=0.8, blur_sigma2=(0.2, 1.5),
                       betag_range2=(0.5, 4.0), betap_range2=(1.0, 2.0), resize_range2=(0.3, 1.2),
                       noise_range2=(1.0, 25.0), poisson_scale_range2=(0.05, 2.5), jpeg_range2=(30.0, 95.0)),
}


# ----------------------------------------------------------------------------- pure operations

def blur(img: Tensor, kernel: Tensor) -> Tensor:
    """Convolve (B, C, H, W) with a (k, k) or per-image (B, k, k) kernel; reflect padding (replicate when the
    image is smaller than the kernel's radius)."""
    kernel = kernel.to(img)
    kernel = kernel[None] if kernel.ndim == 2 else kernel                 # (1 or B, k, k)
    border = "reflect" if min(img.shape[-2:]) > kernel.shape[-1] // 2 else "replicate"
    return filter2d(img, kernel, border_type=border)


def resize(img: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """(B, C, H, W) -> (B, C, *size) with F.interpolate in `mode` (area, bilinear, bicubic; not anti-aliased)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(img, size=tuple(int(s) for s in size), mode=mode, **kwargs)


def _per_image(value: PerImage, img: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=img.dtype, device=img.device).reshape(-1, 1, 1, 1).expand(img.shape[0], 1, 1, 1)


def _randn(shape: Sequence[int], generator: torch.Generator | None, img: Tensor) -> Tensor:
    device = generator.device if generator is not None else img.device
    return torch.randn(tuple(shape), generator=generator, device=device).to(img)


def add_gaussian_noise(img: Tensor, sigma: PerImage, gray: PerImage = False,
                       generator: torch.Generator | None = None) -> Tensor:
    """img + N(0, sigma^2) per pixel, clamped to [0, 1]; sigma in image units (levels / 255), one per image.
    `gray` images get one noise map shared by all channels."""
    b, c, h, w = img.shape
    colour = _randn((b, c, h, w), generator, img)                         # (B, C, H, W)
    mono = _randn((b, 1, h, w), generator, img).expand(b, c, h, w)        # (B, C, H, W), equal channels
    g = _per_image(gray, img)
    noise = (1 - g) * colour + g * mono
    return (img + _per_image(sigma, img) * noise).clamp(0.0, 1.0)


def _poisson(img: Tensor, generator: torch.Generator | None) -> Tensor:
    """Shot noise of each (1, C, H, W) image: Poisson(x * L) / L - x with L = 2^ceil(log2(distinct 8-bit levels))."""
    out = []
    for x in img.split(1):
        x = (x * 255.0).round().clamp(0, 255) / 255.0
        levels = 2 ** math.ceil(math.log2(max(int(torch.unique(x).numel()), 2)))
        rate = (x * levels).to(generator.device if generator is not None else x.device)
        out.append(torch.poisson(rate, generator=generator).to(x) / levels - x)
    return torch.cat(out)


def add_poisson_noise(img: Tensor, scale: PerImage, gray: PerImage = False,
                      generator: torch.Generator | None = None) -> Tensor:
    """img + scale * Poisson shot noise (Real-ESRGAN), clamped to [0, 1]; `gray` images get the noise of their
    luminance on every channel."""
    colour = _poisson(img, generator)                                     # (B, C, H, W)
    mono = _poisson(rgb_to_grayscale(img.clamp(0, 1)), generator).expand_as(img)
    g = _per_image(gray, img)
    return (img + _per_image(scale, img) * ((1 - g) * colour + g * mono)).clamp(0.0, 1.0)


def jpeg(img: Tensor, quality: PerImage) -> Tensor:
    """Encode and decode each image with libjpeg (torchvision) at an integer quality in [1, 100], one per image."""
    q = torch.as_tensor(quality).round().long().reshape(-1).expand(img.shape[0]).tolist()
    if not all(1 <= v <= 100 for v in q):
        raise ValueError(f"JPEG quality must lie in [1, 100], got {q}")
    u8 = (img.detach().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu()  # (B, C, H, W)
    out = [decode_jpeg(encode_jpeg(x, quality=v)) for x, v in zip(u8, q)]
    return torch.stack(out).to(device=img.device, dtype=img.dtype) / 255.0


def usm_sharpen(img: Tensor, weight: float = 0.5, radius: int = 50, threshold: float = 10.0) -> Tensor:
    """Unsharp masking of Real-ESRGAN / StableSR ground truths: img + weight * (img - blur), blended in only where
    |img - blur| exceeds threshold / 255 (a soft mask); Gaussian of size radius (+1 if even), OpenCV's auto sigma."""
    size = radius + 1 if radius % 2 == 0 else radius
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    smooth = lambda x: gaussian_blur2d(x, (size, size), (sigma, sigma), border_type="reflect")  # noqa: E731
    residual = img - smooth(img)
    mask = smooth((residual.abs() * 255.0 > threshold).to(img))
    sharp = (img + weight * residual).clamp(0.0, 1.0)
    return mask * sharp + (1.0 - mask) * img


def quantize(img: Tensor) -> Tensor:
    """Clamp to [0, 1] and round to 8-bit levels."""
    return (img.clamp(0.0, 1.0) * 255.0).round() / 255.0


# ----------------------------------------------------------------------------- the second-order pipeline

def _coin(generator: torch.Generator, p: float) -> bool:
    return uniform(generator, 0.0, 1.0) < p


def _random_resize(img: Tensor, base: tuple[int, int], probs: Sequence[float], scale_range: Sequence[float],
                   modes: Sequence[str], generator: torch.Generator) -> Tensor:
    """Resize to `base` times a factor: up U(1, hi), down U(lo, 1) or keep 1 (probs), in a random mode."""
    kind = choice(generator, probs)
    factor = (uniform(generator, 1.0, scale_range[1]), uniform(generator, scale_range[0], 1.0), 1.0)[kind]
    mode = modes[choice(generator, [1.0] * len(modes))]
    size = tuple(max(1, int(s * factor)) for s in base)
    return resize(img, size, mode)


def _random_noise(img: Tensor, gaussian_prob: float, sigma_range: Sequence[float], poisson_range: Sequence[float],
                  gray_prob: float, generator: torch.Generator) -> Tensor:
    """Gaussian noise (sigma U(range) / 255) with probability gaussian_prob, else Poisson; grey with gray_prob."""
    if _coin(generator, gaussian_prob):
        sigma = uniform(generator, *sigma_range) / 255.0
        return add_gaussian_noise(img, sigma, _coin(generator, gray_prob), generator)
    scale = uniform(generator, *poisson_range)
    return add_poisson_noise(img, scale, _coin(generator, gray_prob), generator)


def _random_jpeg(img: Tensor, quality_range: Sequence[float], generator: torch.Generator) -> Tensor:
    return jpeg(img, round(uniform(generator, *quality_range)))


def degrade_one(hr: Tensor, cfg: DegradationConfig, scale: int, generator: torch.Generator) -> Tensor:
    """One image (1, 3, H, W) in [0, 1] -> its degraded low-resolution version (1, 3, H / scale, W / scale)."""
    h, w = hr.shape[-2:]
    lr_size = (h // scale, w // scale)
    modes = cfg.resize_modes
    kernel1 = random_blur_kernel(generator, cfg.kernel_list, cfg.kernel_prob, cfg.blur_sigma, cfg.betag_range,
                                 cfg.betap_range, cfg.sinc_prob)
    kernel2 = random_blur_kernel(generator, cfg.kernel_list2, cfg.kernel_prob2, cfg.blur_sigma2, cfg.betag_range2,
                                 cfg.betap_range2, cfg.sinc_prob2)
    sinc = random_sinc_kernel(generator) if _coin(generator, cfg.final_sinc_prob) else identity_kernel()
    # round 1
    x = blur(hr, kernel1)                                                                   # (1, 3, H, W)
    x = _random_resize(x, (h, w), cfg.resize_prob, cfg.resize_range, modes, generator)      # (1, 3, ~H, ~W)
    x = _random_noise(x, cfg.gaussian_noise_prob, cfg.noise_range, cfg.poisson_scale_range, cfg.gray_noise_prob,
                      generator)
    x = _random_jpeg(x, cfg.jpeg_range, generator)
    # round 2
    if _coin(generator, cfg.second_blur_prob):
        x = blur(x, kernel2)
    x = _random_resize(x, lr_size, cfg.resize_prob2, cfg.resize_range2, modes, generator)  # (1, 3, ~H/s, ~W/s)
    x = _random_noise(x, cfg.gaussian_noise_prob2, cfg.noise_range2, cfg.poisson_scale_range2, cfg.gray_noise_prob2,
                      generator)
    mode = modes[choice(generator, [1.0] * len(modes))]
    if _coin(generator, 0.5):
        x = blur(resize(x, lr_size, mode), sinc)
        x = _random_jpeg(x, cfg.jpeg_range2, generator)
    else:
        x = _random_jpeg(x, cfg.jpeg_range2, generator)
        x = blur(resize(x, lr_size, mode), sinc)
    return quantize(x)                                                                      # (1, 3, H/s, W/s)


def degrade(hr: Tensor, scale: int, cfg: DegradationConfig | str | Mapping | None = None,
            generator: torch.Generator | None = None) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, H / scale, W / scale) in [0, 1], 8-bit levels; every image draws its own
    parameters from `cfg` (DegradationConfig, preset name or mapping; None = StableSR). Same generator state,
    same output."""
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"degrade: scale must be a positive integer, got {scale!r}")
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"degrade: expected (B, 3, H, W) images, got shape {tuple(hr.shape)}")
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"degrade: image size {h}x{w} is not divisible by scale {scale}")
    cfg = DegradationConfig.from_any(cfg)
    generator = generator if generator is not None else torch.Generator().manual_seed(
        int(torch.randint(0, 2**62, ()).item()))
    return torch.cat([degrade_one(x, cfg, scale, generator) for x in hr.float().split(1)])

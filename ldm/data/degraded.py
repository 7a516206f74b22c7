"""DegradedSuperResolution: (HR, LR) training pairs from any HR dataset, LR made by Real-ESRGAN degradations.

    train:
      target: ldm.data.degraded.DegradedSuperResolution
      params:
        scale: 4
        degradation: stablesr            # or realesrgan, or {preset: realesrgan, jpeg_range: [40, 95], ...}
        usm_sharpen: true                # StableSR's 512 config: sharpen the HR target (and the degradation input)
        upsampled_key: lr_upsampled      # also the LR bicubic-upsampled back to HR size (StableSR's encoder input)
        dataset: {target: ldm.data.image_folder.ImageFolder, params: {root: data/hr, size: 512}}

Samples keep every key of the wrapped dataset; `image` (3, H, W) and `lr_image` (3, H/scale, W/scale) are in
[-1, 1]. Each call draws new degradations (reproducible under torch.manual_seed, like the other datasets);
`fixed=True` makes them a function of (seed, index) alone, for validation sets.
"""
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ldm.data.degradations import DegradationConfig, degrade, usm_sharpen
from ldm.data.tasks import _dataset, _image
from ldm.data.transforms import call_rng


class DegradedSuperResolution(torch.utils.data.Dataset):
    """Adds `lr_key`: `image_key` degraded by the second-order model and downscaled by `scale`."""

    def __init__(self,
                 dataset: Mapping | torch.utils.data.Dataset,     # HR samples with `image_key` in [-1, 1]
                 scale: int = 4,                                  # any integer >= 1 (2, 3, 4, 8, ...)
                 degradation: DegradationConfig | str | Mapping | None = None,  # None = StableSR ranges
                 image_key: str = "image",
                 lr_key: str = "lr_image",
                 upsampled_key: str | None = None,                # bicubic LR at HR size, when named
                 usm_sharpen: bool = False,                       # sharpen the HR (target and input) first
                 no_degradation_prob: float = 0.0,                # LR := clean bicubic downscale, upsampled := HR
                                                                  # (StableSR: 0.01)
                 seed: int = 0,
                 fixed: bool = False):                            # degradations a function of (seed, index)
        if not isinstance(scale, int) or scale < 1:
            raise ValueError(f"DegradedSuperResolution: scale must be a positive integer, got {scale!r}")
        if not 0.0 <= no_degradation_prob <= 1.0:
            raise ValueError(f"DegradedSuperResolution: no_degradation_prob must lie in [0, 1], "
                             f"got {no_degradation_prob}")
        self.dataset = _dataset(dataset, "DegradedSuperResolution")
        self.config = DegradationConfig.from_any(degradation)
        self.scale, self.image_key, self.lr_key, self.upsampled_key = scale, image_key, lr_key, upsampled_key
        self.usm_sharpen, self.no_degradation_prob = usm_sharpen, no_degradation_prob
        self.seed, self.fixed = seed, fixed

    def __len__(self) -> int:
        return len(self.dataset)

    def generator(self, i: int) -> torch.Generator:
        """The torch.Generator of call i: fixed per (seed, i), or fresh per call (see transforms.call_rng)."""
        rng = np.random.default_rng([self.seed, i]) if self.fixed else call_rng(self.seed, i)
        return torch.Generator().manual_seed(int(rng.integers(0, 2**62)))

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = dict(self.dataset[i])
        hr = _image(sample, self.image_key, "DegradedSuperResolution")       # (3, H, W) in [-1, 1]
        h, w = hr.shape[-2:]
        if h % self.scale or w % self.scale:
            raise ValueError(f"DegradedSuperResolution: image size {h}x{w} is not divisible by scale {self.scale}; "
                             f"crop the wrapped dataset to a multiple of it")
        x = ((hr.float()[None] + 1.0) / 2.0).clamp(0.0, 1.0)                 # (1, 3, H, W) in [0, 1]
        if self.usm_sharpen:
            x = usm_sharpen(x)
            sample[self.image_key] = x[0] * 2.0 - 1.0
        g = self.generator(i)
        clean = torch.rand((), generator=g).item() < self.no_degradation_prob
        if clean:
            lr = F.interpolate(x, size=(h // self.scale, w // self.scale), mode="bicubic", antialias=True)
        else:
            lr = degrade(x, self.scale, self.config, g)                       # (1, 3, H/s, W/s)
        lr = lr.clamp(0.0, 1.0) * 2.0 - 1.0
        sample[self.lr_key] = lr[0]                                           # (3, H/s, W/s) in [-1, 1]
        if self.upsampled_key is not None:
            up = x * 2.0 - 1.0 if clean else F.interpolate(lr, size=(h, w), mode="bicubic", align_corners=False)
            sample[self.upsampled_key] = up[0].clamp(-1.0, 1.0)               # (3, H, W); clean: the HR itself
        return sample

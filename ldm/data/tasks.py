"""Dataset wrappers that add the inputs of concat-conditioned tasks to another dataset's samples.

    SuperResolution: `lr_image`, the bicubic (anti-aliased) downscale of `image` by `scale`, in [-1, 1].
    Inpainting: `mask` (1, H, W) with 1 = the region to fill, and `masked_image` = image * (1 - mask).

`dataset` is a `{target, params}` config (or a dataset object); every key of its samples is kept.
"""
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ldm.data.transforms import call_rng
from ldm.util import instantiate_from_config

MASK_STREAM = 1  # call_rng stream of the masks: independent of the wrapped dataset's crop under one SeededIndex


def _dataset(dataset: Mapping | torch.utils.data.Dataset, owner: str) -> torch.utils.data.Dataset:
    if isinstance(dataset, Mapping):
        return instantiate_from_config(dataset, where=f"{owner}.dataset")
    return dataset


def _image(sample: Mapping[str, Any], key: str, owner: str) -> torch.Tensor:
    if key not in sample:
        raise KeyError(f"{owner}: the wrapped dataset's samples have no {key!r} (image_key); keys: {sorted(sample)}")
    return sample[key]


class SuperResolution(torch.utils.data.Dataset):
    """Adds `lr_key`: `image_key` (3, H, W) downscaled by `scale` with anti-aliased bicubic, (3, H/scale, W/scale)."""

    def __init__(self, dataset: Mapping | torch.utils.data.Dataset, scale: int = 4, image_key: str = "image",
                 lr_key: str = "lr_image"):
        if not isinstance(scale, int) or scale < 1:
            raise ValueError(f"SuperResolution: scale must be a positive integer, got {scale!r}")
        self.dataset = _dataset(dataset, "SuperResolution")
        self.scale, self.image_key, self.lr_key = scale, image_key, lr_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = dict(self.dataset[i])
        hr = _image(sample, self.image_key, "SuperResolution")                # (3, H, W)
        h, w = hr.shape[-2:]
        if h % self.scale or w % self.scale:
            raise ValueError(f"SuperResolution: image size {h}x{w} is not divisible by scale {self.scale}")
        lr = F.interpolate(hr[None], size=(h // self.scale, w // self.scale), mode="bicubic", antialias=True)
        sample[self.lr_key] = lr[0].clamp(-1.0, 1.0)                          # (3, H/s, W/s)
        return sample


def random_box_mask(size: tuple[int, int], rng: np.random.Generator, max_boxes: int = 3,
                    min_extent: float = 0.2, max_extent: float = 0.5) -> torch.Tensor:
    """(1, H, W) float mask, 1 inside 1..max_boxes random rectangles whose sides are min..max_extent of the image."""
    h, w = size
    mask = torch.zeros(1, h, w)
    for _ in range(int(rng.integers(1, max_boxes + 1))):
        bh, bw = (max(1, round(rng.uniform(min_extent, max_extent) * s)) for s in (h, w))
        top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        mask[:, top:top + bh, left:left + bw] = 1.0
    return mask


class Inpainting(torch.utils.data.Dataset):
    """Adds `mask_key` (1, H, W) in {0, 1} (1 = hole, random boxes) and `masked_image_key` = image * (1 - mask).

    fixed_masks: the mask is a function of (seed, index) (validation); otherwise a new mask on every call,
    reproducible under torch.manual_seed or from a SeededIndex (see transforms.call_rng).
    """

    def __init__(self, dataset: Mapping | torch.utils.data.Dataset, image_key: str = "image", mask_key: str = "mask",
                 masked_image_key: str = "masked_image", max_boxes: int = 3, min_extent: float = 0.2,
                 max_extent: float = 0.5, seed: int = 0, fixed_masks: bool = False):
        if max_boxes < 1 or not 0 < min_extent <= max_extent <= 1:
            raise ValueError(f"Inpainting: need max_boxes >= 1 and 0 < min_extent <= max_extent <= 1, got "
                             f"{max_boxes}, {min_extent}, {max_extent}")
        self.dataset = _dataset(dataset, "Inpainting")
        self.image_key, self.mask_key, self.masked_image_key = image_key, mask_key, masked_image_key
        self.max_boxes, self.min_extent, self.max_extent = max_boxes, min_extent, max_extent
        self.seed, self.fixed_masks = seed, fixed_masks

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = dict(self.dataset[i])
        image = _image(sample, self.image_key, "Inpainting")                   # (3, H, W)
        rng = np.random.default_rng([self.seed, i]) if self.fixed_masks else call_rng(self.seed, i, stream=MASK_STREAM)
        mask = random_box_mask(tuple(image.shape[-2:]), rng, self.max_boxes, self.min_extent, self.max_extent)
        sample[self.mask_key] = mask                                            # (1, H, W)
        sample[self.masked_image_key] = image * (1.0 - mask)                    # (3, H, W), holes at 0
        return sample

"""Photos: random crops of the real RGB photographs that ship inside scikit-image (no download).

Training uses astronaut, hubble_deep_field, immunohistochemistry, both views of
stereo_motorcycle, retina and rocket. Validation uses two whole photographs never seen in
training, chelsea and coffee (`skimage.data.cat` is chelsea again, so it is left out). The other
`skimage.data` pictures are grey, drawings (colorwheel, logo) or need an optional download.
"""
import functools
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.data.transforms import SquareCrop, call_rng, square_crop, to_rgb, to_tensor
from ldm.util import default

TRAIN_PHOTOS = ("astronaut", "hubble_deep_field", "immunohistochemistry",
                "motorcycle_left", "motorcycle_right", "retina", "rocket")
VALIDATION_PHOTOS = ("chelsea", "coffee")
VALIDATION_SEED = 20240  # validation crops depend on this alone: the same set every epoch and run


@functools.cache
def load_photo(name: str) -> Image.Image:
    """One bundled photograph as an RGB PIL image, read once per process."""
    import skimage.data  # lazy: only this dataset needs scikit-image

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = skimage.data.stereo_motorcycle()
        arr = left if name == "motorcycle_left" else right
    elif name in TRAIN_PHOTOS + VALIDATION_PHOTOS:
        arr = getattr(skimage.data, name)()
    else:
        raise ValueError(f"Photos: unknown photograph {name!r}; "
                         f"known: {', '.join(TRAIN_PHOTOS + VALIDATION_PHOTOS)}")
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr)))


class Photos(torch.utils.data.Dataset):
    """size x size crops of real photographs -> {"image"} in [-1, 1].

    A crop is cut after shrinking the photograph by a factor drawn uniformly from `scale`
    (1.0 = native pixels), then mirrored with probability 0.5. "train" draws a new crop on every
    call (reproducible under torch.manual_seed / DataLoader worker seeding); "validation" is a
    fixed list of `length` crops, alternating chelsea and coffee.
    """

    def __init__(self,
                 split: str = "train",                      # "train" | "validation"
                 size: int = 64,                            # output side in pixels
                 length: int | None = None,                 # samples per epoch (train 2000, validation 256)
                 seed: int = 0,                             # mixed into the training crop RNG
                 scale: tuple[float, float] = (0.5, 1.0),   # range of the downscale factor before cropping
                 flip: bool = True):                        # random horizontal mirror
        if split not in ("train", "validation"):
            raise ValueError(f"Photos: split must be 'train' or 'validation', got {split!r}")
        lo, hi = scale
        if not 0 < lo <= hi:
            raise ValueError(f"Photos: scale must satisfy 0 < low <= high, got {tuple(scale)}")
        self.split, self.size, self.seed, self.scale, self.flip = split, size, seed, (lo, hi), flip
        self.names = TRAIN_PHOTOS if split == "train" else VALIDATION_PHOTOS
        self.length = default(length, 2000 if split == "train" else 256)
        if self.length <= 0:
            raise ValueError(f"Photos: length must be positive, got {self.length}")
        self.photos = [load_photo(n) for n in self.names]
        self.crops: list[tuple[int, SquareCrop]] = []
        if split == "validation":
            rng = np.random.default_rng(VALIDATION_SEED)
            self.crops = [self._draw(i % len(self.names), rng) for i in range(self.length)]

    def __len__(self) -> int:
        return self.length

    def _draw(self, k: int, rng: np.random.Generator) -> tuple[int, SquareCrop]:
        w, h = self.photos[k].size
        side = round(self.size / rng.uniform(*self.scale))
        return k, square_crop(w, h, side, rng, flip=self.flip)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.length:
            raise IndexError(f"Photos index {i} out of range for length {self.length}")
        if self.split == "validation":
            k, crop = self.crops[i]
        else:
            rng = call_rng(self.seed, i)
            k, crop = self._draw(int(rng.integers(len(self.names))), rng)
        return {"image": to_tensor(crop.apply(self.photos[k], self.size))}

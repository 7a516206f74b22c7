"""Small image helpers shared by the datasets: RGB conversion, tensors in [-1, 1], square crops with boxes."""
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

RESAMPLE = Image.Resampling.BICUBIC  # PIL's bicubic widens its kernel when shrinking, so it is anti-aliased


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited over `background`, 16/32-bit greys are rescaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB PIL image or uint8 (H, W, 3) array -> float32 (3, H, W) in [-1, 1] (numpy maths: no torch threads)."""
    arr = np.asarray(img).astype(np.float32)  # (H, W, 3) in [0, 255]
    arr /= 127.5
    arr -= 1.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (3, H, W)


def index_salt(index: int) -> int:
    """The seed of one sample's random augmentation: carried by a `SeededIndex` (ResumableSampler: a pure
    function of seed, epoch and position), else drawn from torch's global RNG.

    DataLoader workers seed torch's global RNG from the base seed and the worker id, so a draw is reproducible
    per (seed_everything, worker) while still changing every call; only seeded indices make it independent of
    the worker, the prefetching and a restart.
    """
    salt = getattr(index, "salt", None)
    return int(torch.randint(0, 2**62, ()).item()) if salt is None else salt


def call_rng(seed: int, index: int, salt: int | None = None, stream: int = 0) -> np.random.Generator:
    """A fresh generator per __getitem__ call, from (dataset seed, index, salt); salt default: index_salt(index).

    `stream` separates the draws of datasets stacked on one index (a wrapper's mask, its base dataset's crop),
    which share a SeededIndex's salt.
    """
    entropy = [seed, int(index), index_salt(index) if salt is None else salt] + ([stream] if stream else [])
    return np.random.default_rng(entropy)


@dataclass(frozen=True)
class SquareCrop:
    """A square region (left, top, side) of an image of size (width, height), optionally mirrored."""
    width: int
    height: int
    left: int
    top: int
    side: int
    flip: bool = False

    def apply(self, img: Image.Image, size: int) -> Image.Image:
        """Cut the region and resize it to size x size."""
        box = (self.left, self.top, self.left + self.side, self.top + self.side)
        out = img.resize((size, size), RESAMPLE, box=box)
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.flip else out

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Rows (class, x0, y0, x1, y1) normalised to the image -> normalised to the crop; clipped,
        rows that fall outside the crop are dropped."""
        if len(boxes) == 0:
            return boxes.reshape(0, 5)
        out = boxes.astype(np.float32).copy()
        out[:, [1, 3]] = (out[:, [1, 3]] * self.width - self.left) / self.side
        out[:, [2, 4]] = (out[:, [2, 4]] * self.height - self.top) / self.side
        out[:, 1:] = np.clip(out[:, 1:], 0.0, 1.0)
        if self.flip:
            out[:, [1, 3]] = 1.0 - out[:, [3, 1]]
        keep = (out[:, 3] > out[:, 1]) & (out[:, 4] > out[:, 2])
        return out[keep]


def square_crop(width: int, height: int, side: int, rng: np.random.Generator,
                center: bool = False, flip: bool = False) -> SquareCrop:
    """A side x side crop (clamped to the image) at a random position or the centre; mirrored with p=0.5 if `flip`."""
    side = min(side, width, height)
    if center:
        left, top = (width - side) // 2, (height - side) // 2
    else:
        left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    return SquareCrop(width, height, left, top, side, bool(flip and rng.random() < 0.5))


def pad_objects(rows: Sequence[Sequence[float]] | np.ndarray, max_objects: int) -> torch.Tensor:
    """Rows (class, x0, y0, x1, y1) -> float32 (max_objects, 5); padding rows have class -1."""
    out = torch.zeros(max_objects, 5, dtype=torch.float32)
    out[:, 0] = -1.0
    rows = np.asarray(rows, dtype=np.float32).reshape(-1, 5)
    if len(rows) > max_objects:
        raise ValueError(f"{len(rows)} objects do not fit max_objects={max_objects}")
    out[: len(rows)] = torch.from_numpy(rows)
    return out

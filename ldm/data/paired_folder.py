"""PairedImageFolder: real LR/HR pairs (RealSR, DRealSR, your own camera pairs) from two folders.

    hr_root/a.png      lr_root/a.png         partners share their path relative to the root, without the
    hr_root/x/b.jpg    lr_root/x/b.png       extension and without `hr_suffix` / `lr_suffix` at the end of the
                                             name ("Canon_001_HR" and "Canon_001_LR4" with suffixes "_HR", "_LR4")

Every HR picture is `scale` times its LR partner (or the same size with `lr_upsampled=True`, for sets whose LR
was resized back to HR size); unpaired files and wrong sizes are errors naming the files. A sample is an
aligned crop, `size` HR pixels square (a multiple of `scale`) and `size / scale` LR pixels, cut at a random
LR-grid position ("random") or the centre ("center"), both mirrored together when `flip`:

    {"image": (3, size, size), "lr_image": (3, size/scale, size/scale), "file_name": "x/b"}  in [-1, 1]

`size=None` returns the whole pictures (batch size 1 unless they all share one size).
"""
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ldm.data.image_folder import IMAGE_EXTENSIONS, find_images
from ldm.data.transforms import call_rng, to_rgb, to_tensor


def pair_key(root: Path, path: Path, suffix: str) -> str:
    """The matching key of `path`: its path under `root` without extension and without a trailing `suffix`."""
    key = path.relative_to(root).with_suffix("").as_posix()
    return key[: -len(suffix)] if suffix and key.endswith(suffix) else key


def oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed: swapped when the EXIF orientation turns the picture by 90 degrees."""
    with Image.open(path) as img:
        w, h = img.size
        return (h, w) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


def _index(root: Path, extensions: tuple[str, ...], suffix: str, side: str) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in find_images(root, extensions):
        key = pair_key(root, path, suffix)
        if key in index:
            raise ValueError(f"PairedImageFolder: {side} files {index[key]} and {path} both match the name {key!r}")
        index[key] = path
    return index


def _unpaired(keys: Iterable[str], index: dict[str, Path], side: str, other: str, other_root: Path) -> str:
    keys = sorted(keys)
    shown = ", ".join(str(index[k]) for k in keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    return f"{len(keys)} {side} file(s) have no {other} partner under {other_root}: {shown}"


class PairedImageFolder(torch.utils.data.Dataset):
    """Aligned (HR, LR) crops of real image pairs matched by file name (module docstring)."""

    def __init__(self,
                 hr_root: str | Path,
                 lr_root: str | Path,
                 scale: int = 4,                      # HR side / LR side
                 size: int | None = 256,              # HR crop side (multiple of scale); None = whole pictures
                 crop: str = "random",                # "random" | "center"
                 flip: bool = True,                   # mirror both with p = 0.5
                 hr_suffix: str = "",                 # removed from HR names before matching
                 lr_suffix: str = "",                 # removed from LR names before matching
                 lr_upsampled: bool = False,          # LR files have the HR size (downscaled here)
                 upsampled_key: str | None = None,    # also return the LR at HR size under this key
                 extensions: Iterable[str] | None = None,
                 seed: int = 0):
        if not isinstance(scale, int) or scale < 1:
            raise ValueError(f"PairedImageFolder: scale must be a positive integer, got {scale!r}")
        if crop not in ("random", "center"):
            raise ValueError(f"PairedImageFolder: crop must be 'random' or 'center', got {crop!r}")
        if size is not None and (size <= 0 or size % scale):
            raise ValueError(f"PairedImageFolder: size {size} must be a positive multiple of scale {scale}")
        self.hr_root, self.lr_root = Path(hr_root).expanduser(), Path(lr_root).expanduser()
        self.scale, self.size, self.crop, self.flip, self.seed = scale, size, crop, flip, seed
        self.lr_upsampled, self.upsampled_key = lr_upsampled, upsampled_key
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in (extensions or IMAGE_EXTENSIONS))
        hr, lr = _index(self.hr_root, exts, hr_suffix, "HR"), _index(self.lr_root, exts, lr_suffix, "LR")
        problems = [_unpaired(set(hr) - set(lr), hr, "HR", "LR", self.lr_root) if set(hr) - set(lr) else "",
                    _unpaired(set(lr) - set(hr), lr, "LR", "HR", self.hr_root) if set(lr) - set(hr) else ""]
        if any(problems):
            raise ValueError("PairedImageFolder: " + "; ".join(p for p in problems if p)
                             + " (partners share their relative path without extension; see hr_suffix / lr_suffix)")
        self.names = sorted(hr)
        self.pairs = [(hr[k], lr[k]) for k in self.names]
        for hr_path, lr_path in self.pairs:
            self._check_sizes(hr_path, lr_path)

    def __len__(self) -> int:
        return len(self.pairs)

    def _check_sizes(self, hr_path: Path, lr_path: Path) -> None:
        """HR against its partner's size and the crop size (headers only: nothing is decoded)."""
        hr_size, lr_size = oriented_size(hr_path), oriented_size(lr_path)
        s = self.scale
        if hr_size[0] % s or hr_size[1] % s:
            raise ValueError(f"PairedImageFolder: HR {hr_path} is {hr_size[0]}x{hr_size[1]}, "
                             f"not divisible by scale {s}")
        expected = hr_size if self.lr_upsampled else (hr_size[0] // s, hr_size[1] // s)
        if lr_size != expected:
            raise ValueError(f"PairedImageFolder: LR {lr_path} is {lr_size[0]}x{lr_size[1]} but its HR partner "
                             f"{hr_path} is {hr_size[0]}x{hr_size[1]}; expected LR {expected[0]}x{expected[1]} "
                             f"(scale {s}{', lr_upsampled' if self.lr_upsampled else ''})")
        if self.size is not None and min(hr_size) < self.size:
            raise ValueError(f"PairedImageFolder: HR {hr_path} is {hr_size[0]}x{hr_size[1]}, smaller than the "
                             f"crop size {self.size}")

    @staticmethod
    def _read(path: Path) -> Image.Image:
        with Image.open(path) as img:
            return to_rgb(ImageOps.exif_transpose(img))

    def _box(self, width: int, height: int, i: int) -> tuple[int, int, int, int, bool]:
        """(left, top, width, height) of the HR crop on the LR grid, and the mirror flag."""
        s = self.scale
        if self.size is None:
            return 0, 0, width, height, False
        rng = call_rng(self.seed, i)
        cols, rows = (width - self.size) // s, (height - self.size) // s      # LR-grid positions - 1
        if self.crop == "center":
            left, top = cols // 2 * s, rows // 2 * s
        else:
            left, top = int(rng.integers(0, cols + 1)) * s, int(rng.integers(0, rows + 1)) * s
        return left, top, self.size, self.size, bool(self.flip and rng.random() < 0.5)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"PairedImageFolder index {i} out of range for {len(self)} pairs")
        hr_path, lr_path = self.pairs[i]
        hr_img, lr_img = self._read(hr_path), self._read(lr_path)
        left, top, w, h, flip = self._box(*hr_img.size, i)
        s = 1 if self.lr_upsampled else self.scale
        hr = to_tensor(hr_img.crop((left, top, left + w, top + h)))                       # (3, h, w)
        lr = to_tensor(lr_img.crop((left // s, top // s, (left + w) // s, (top + h) // s)))  # (3, h/s, w/s)
        if flip:
            hr, lr = hr.flip(-1), lr.flip(-1)
        sample = {"image": hr, "file_name": self.names[i]}
        small = (h // self.scale, w // self.scale)
        if self.lr_upsampled:
            sample["lr_image"] = F.interpolate(lr[None], size=small, mode="bicubic", antialias=True)[0].clamp(-1, 1)
        else:
            sample["lr_image"] = lr                                                         # (3, h/scale, w/scale)
        if self.upsampled_key is not None:
            up = lr[None] if self.lr_upsampled else F.interpolate(lr[None], size=(h, w), mode="bicubic")
            sample[self.upsampled_key] = up[0].clamp(-1.0, 1.0)                             # (3, h, w)
        return sample

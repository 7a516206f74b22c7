"""CFWPairs: training triples for StableSR's CFW decoder fusion, in the folder layout of StableSR's
`generate_vqgan_data.py` (names shared across the sub-folders):

    root/inputs/0001.png    the LR image bicubic-upsampled to HR size (what the SR model was given)
    root/gts/0001.png       the HR ground truth
    root/latents/0001.npy   the latent the SR model sampled for it, (1, C, H/f, W/f) or (C, H/f, W/f), scaled

-> {"lq": (3, H, W), "gt": (3, H, W) in [-1, 1], "latent": (C, H/f, W/f) float32, "file_name": "0001"}.
`save_cfw_pair` writes one triple in this layout (for a data-generation script).
"""
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.data.image_folder import IMAGE_EXTENSIONS
from ldm.data.transforms import to_rgb, to_tensor

SUBFOLDERS = ("inputs", "gts", "latents")


def _stems(folder: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"CFWPairs: folder {folder} does not exist "
                                f"(need {', '.join(SUBFOLDERS)} under the root)")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in extensions and p.is_file()}


class CFWPairs(torch.utils.data.Dataset):
    """(lq, gt, latent) triples matched by file name under root/{inputs, gts, latents}; unmatched files are errors."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        inputs = _stems(self.root / "inputs", IMAGE_EXTENSIONS)
        gts = _stems(self.root / "gts", IMAGE_EXTENSIONS)
        latents = _stems(self.root / "latents", (".npy",))
        names = set(inputs) | set(gts) | set(latents)
        incomplete = sorted(n for n in names if not (n in inputs and n in gts and n in latents))
        if incomplete:
            raise ValueError(f"CFWPairs: {len(incomplete)} name(s) under {self.root} lack an inputs/ png, gts/ png or "
                             f"latents/ npy, e.g. {', '.join(incomplete[:5])}")
        if not names:
            raise ValueError(f"CFWPairs: no triples under {self.root}")
        self.names = sorted(names)
        self.files = [(inputs[n], gts[n], latents[n]) for n in self.names]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        lq_path, gt_path, latent_path = self.files[i]
        with Image.open(lq_path) as a, Image.open(gt_path) as b:
            lq, gt = to_tensor(to_rgb(a)), to_tensor(to_rgb(b))              # (3, H, W) each
        latent = torch.from_numpy(np.load(latent_path).astype(np.float32))
        latent = latent[0] if latent.ndim == 4 else latent                  # (C, H/f, W/f)
        if lq.shape != gt.shape or latent.ndim != 3 or gt.shape[-1] % latent.shape[-1] \
                or gt.shape[-2] * latent.shape[-1] != gt.shape[-1] * latent.shape[-2]:
            raise ValueError(f"CFWPairs: {self.names[i]!r}: inputs {tuple(lq.shape)}, gts {tuple(gt.shape)} and "
                             f"latents {tuple(latent.shape)} do not fit (same image size, latent 1/f of it)")
        return {"lq": lq, "gt": gt, "latent": latent, "file_name": self.names[i]}


def _png(image: torch.Tensor, path: Path) -> None:
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)   # (3, H, W)
    Image.fromarray(arr.permute(1, 2, 0).numpy()).save(path)


def save_cfw_pair(root: str | Path, name: str, lq: torch.Tensor, gt: torch.Tensor, latent: torch.Tensor) -> None:
    """Write one triple: lq, gt (3, H, W) in [-1, 1] as PNGs, latent (C, h, w) (scaled, as sampled) as .npy."""
    root = Path(root)
    for sub in SUBFOLDERS:
        (root / sub).mkdir(parents=True, exist_ok=True)
    _png(lq, root / "inputs" / f"{name}.png")
    _png(gt, root / "gts" / f"{name}.png")
    np.save(root / "latents" / f"{name}.npy", latent.detach().float().cpu().numpy())

"""Reconstruction evaluation of a first-stage autoencoder: PSNR, SSIM, LPIPS, rFID, and a bicubic reference.

The bicubic reference down-samples each image by the autoencoder's factor f (antialiased bicubic) and up-samples
it back (bicubic): an image of as many numbers per pixel as a 3-channel latent, the yardstick beside the numbers.
"""
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ldm.eval.metrics import GenerativeMetrics, ReconstructionMetrics

BICUBIC = "bicubic, antialiased downscale by f then bicubic upscale"


def bicubic_down_up(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> the same size after bicubic x1/factor and back, clamped to [-1, 1]."""
    lr = F.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True)   # (B, C, H/f, W/f)
    return F.interpolate(lr, size=x.shape[-2:], mode="bicubic").clamp(-1, 1)        # (B, C, H, W)


def image_batches(dataset: Dataset, batch_size: int, limit: int | None = None,
                  key: str = "image") -> Iterator[torch.Tensor]:
    """The dataset's `key` tensors, in order, in batches (at most `limit` images)."""
    seen = 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x = batch[key]
        if limit is not None:
            x = x[: limit - seen]
        if len(x) == 0:
            return
        seen += len(x)
        yield x


def evaluate_reconstruction(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device,
                            lpips_net: nn.Module | None = None, extractor: nn.Module | None = None,
                            bicubic_factor: int | None = None, progress=None) -> dict[str, dict[str, float]]:
    """{"autoencoder": {...}, "bicubic": {...}} with psnr, ssim (and lpips, fid) means over all images, the image
    count and the image side (`images`, `image_size`).

    model.reconstruct(x) gives the reconstruction; `extractor` (ldm.eval.features) enables rFID (reconstructions
    against the inputs); bicubic_factor adds the bicubic reference on the same images.
    """
    arms = {"autoencoder": model.reconstruct}
    if bicubic_factor:
        arms["bicubic"] = lambda x: bicubic_down_up(x, bicubic_factor)
    quality = {name: ReconstructionMetrics(lpips_net).to(device) for name in arms}
    fid = {name: GenerativeMetrics(extractor, kid=False, inception_score=False).to(device)
           for name in arms} if extractor is not None else {}
    count, size = 0, 0
    for x in batches:
        x = x.to(device)
        count, size = count + len(x), x.shape[-1]
        for name, reconstruct in arms.items():
            xrec = reconstruct(x).clamp(-1, 1)
            quality[name].update(xrec, x)
            if name in fid:
                fid[name].update(x, real=True)
                fid[name].update(xrec, real=False)
        if progress is not None:
            progress(count)
    results = {}
    for name in arms:
        numbers = {k: float(v) for k, v in quality[name].compute().items()}
        if name in fid:
            numbers["rfid"] = float(fid[name].compute()["fid"])
        results[name] = numbers | {"images": count, "image_size": int(size)}
    return results

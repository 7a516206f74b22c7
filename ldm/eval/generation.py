"""Sample quality against real images: `--task generation` (FID, KID, IS) and `--task superres` (Y-channel
PSNR/SSIM, LPIPS, FID beside bicubic up-sampling).

Samples are paired with the reference split: sample i is drawn under the condition of reference image i (its
class, caption, layout, low-resolution image; nothing for an unconditional model), from noise seeded with
seed + i, so conditional FID compares like with like. Two reference arms bracket a generation FID:
- floor: as many real images of another split (an ideal generator's score at this sample count);
- ceiling: the same model with its denoising network freshly initialised (untrained), first stage kept.
"""
import copy
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ldm.eval.metrics import GenerativeMetrics, ReconstructionMetrics
from ldm.sampling_cli import sampler_kwargs, step_generator
from ldm.sampling_conditions import SamplingError
from ldm.util import instantiate_from_config

Progress = Callable[[int], None] | None


def first_items(batches: Iterable[Mapping[str, Any]], count: int) -> Iterator[dict[str, Any]]:
    """The collated `batches`, cut so that together they hold their first `count` items (tensors and lists are
    cut; other values pass as they are)."""
    seen = 0
    for batch in batches:
        take = min(len(next(iter(v for v in batch.values() if isinstance(v, torch.Tensor)))), count - seen)
        if take <= 0:
            return
        yield {k: v[:take] if isinstance(v, (torch.Tensor, list, tuple)) else v for k, v in batch.items()}
        seen += take


def reference_batches(dataset: Dataset, count: int, batch_size: int) -> Iterator[dict[str, Any]]:
    """The first `count` items of `dataset`, collated in order; an error when it holds fewer."""
    if len(dataset) < count:
        raise SamplingError(f"the reference split holds {len(dataset)} images, {count} are needed: raise its length "
                         f"(e.g. data.params.validation.params.length={count}, or ...validation.params.dataset."
                         f"params.length={count} when a task wraps the dataset) or lower --n")
    return first_items(DataLoader(dataset, batch_size=batch_size, shuffle=False), count)


@torch.no_grad()
def sample_like(model: nn.Module, batch: Mapping[str, Any], first_seed: int, opt: Any,
                use_ema: bool = True) -> torch.Tensor:
    """One sample (B, C, H, W) in [-1, 1] on the CPU per item of `batch`, under the item's own condition."""
    _, cond = model.get_input(batch, drop=False)
    n = len(model.get_image(batch))
    shape = model.sample_shape(1, {k: v[:1] for k, v in cond.items()})[1:]
    x_T = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(first_seed + j)) for j in range(n)])
    return model.sample(cond or None, batch_size=n, guidance_scale=opt.scale, generator=step_generator(first_seed),
                        x_T=x_T.to(model.device), use_ema=use_ema, **sampler_kwargs(opt)).float().cpu()


def untrained_copy(model: nn.Module, unet_config: Mapping, seed: int) -> nn.Module:
    """`model` with its denoising network re-initialised from `unet_config` under `seed` (the FID ceiling)."""
    fresh = copy.deepcopy(model)
    torch.manual_seed(seed)
    net = instantiate_from_config(unet_config).to(model.device)
    fresh.model.diffusion_model.load_state_dict(net.state_dict())
    return fresh.eval()


def evaluate_generation(model: nn.Module, reference: Dataset, count: int, opt: Any, extractor: nn.Module,
                        floor: Dataset | None = None, ceiling: nn.Module | None = None,
                        progress: Progress = None) -> dict[str, dict[str, float]]:
    """{arm: {fid, kid_mean, kid_std, kid_subset_size[, is_mean, is_std]}} for arms model[, floor, ceiling]."""
    device = model.device
    arms = {"model": GenerativeMetrics(extractor).to(device)}
    if floor is not None:
        arms["floor"] = GenerativeMetrics(extractor).to(device)
        floor_batches = reference_batches(floor, count, opt.batch_size)
    if ceiling is not None:
        arms["ceiling"] = GenerativeMetrics(extractor).to(device)
    seen = 0
    for batch in reference_batches(reference, count, opt.batch_size):
        real = model.get_image(batch)                                           # (B, 3, H, W)
        for metrics in arms.values():
            metrics.update(real, real=True)
        arms["model"].update(sample_like(model, batch, opt.seed + seen, opt).to(device), real=False)
        if floor is not None:
            arms["floor"].update(model.get_image(next(floor_batches)), real=False)
        if ceiling is not None:
            arms["ceiling"].update(sample_like(ceiling, batch, opt.seed + seen, opt, use_ema=False).to(device),
                                   real=False)
        seen += len(real)
        if progress:
            progress(seen)
    return {name: metrics.compute() | {"images": seen} for name, metrics in arms.items()}


def evaluate_superres(model: nn.Module, reference: Dataset, count: int, opt: Any, lr_key: str, scale: int,
                      lpips_net: nn.Module | None = None, extractor: nn.Module | None = None,
                      progress: Progress = None) -> dict[str, dict[str, float]]:
    """{arm: {psnr_y, ssim_y[, lpips][, fid]}} for the model's samples and bicubic up-sampling of the same LR
    images; PSNR/SSIM on the BT.601 Y channel with `scale` border pixels cropped (SR papers' protocol)."""
    device = model.device
    quality = {arm: ReconstructionMetrics(lpips_net, y_channel=True, crop_border=scale).to(device)
               for arm in ("model", "bicubic")}
    fid = {arm: GenerativeMetrics(extractor, kid=False, inception_score=False).to(device)
           for arm in quality} if extractor is not None else {}
    seen = 0
    for batch in reference_batches(reference, count, opt.batch_size):
        hr = model.get_image(batch, "image")                                    # (B, 3, H, W)
        lr = model.get_image(batch, lr_key)                                     # (B, 3, H/s, W/s)
        outputs = {"model": sample_like(model, batch, opt.seed + seen, opt).to(device),
                   "bicubic": F.interpolate(lr, size=hr.shape[-2:], mode="bicubic").clamp(-1, 1)}
        for arm, sr in outputs.items():
            quality[arm].update(sr, hr)
            if arm in fid:
                fid[arm].update(hr, real=True)
                fid[arm].update(sr, real=False)
        seen += len(hr)
        if progress:
            progress(seen)
    results = {}
    for arm in quality:
        numbers = {k: float(v) for k, v in quality[arm].compute().items()}
        if arm in fid:
            numbers["fid"] = fid[arm].compute()["fid"]
        results[arm] = numbers | {"images": seen}
    return results

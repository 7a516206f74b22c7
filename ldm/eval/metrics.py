"""Image metrics with stated protocols: PSNR, SSIM, LPIPS (reconstruction / SR) and FID, KID, IS (generation).

Every function and class here takes images in the project's format, float (B, 3, H, W) in [-1, 1],
and maps them to [0, 1] by (x + 1) / 2 (clamped). The protocols, also written into the JSON record
(`METRIC_DEFINITIONS`):

- PSNR: per image, 10 log10(1 / MSE) on [0, 1] values (data range 1), then averaged over images
  (identical images give +inf, which makes the mean +inf).
- SSIM: per image, torchmetrics' SSIM (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 1),
  mean over channels, then averaged over images.
- Y channel (super-resolution): BT.601 luma of RGB in [0, 1] as in MATLAB's rgb2ycbcr, used by SR
  papers: Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255, in [16/255, 235/255]; PSNR/SSIM then use
  data range 1; `crop_border` pixels are cut from each side first (SR papers crop the scale factor).
- LPIPS: the `lpips` package's distance (`ldm.losses.lpips.build_lpips`) on [-1, 1] inputs, per image.
- FID/KID/IS: torchmetrics' FrechetInceptionDistance, KernelInceptionDistance and InceptionScore on
  the features of a named extractor (`ldm.eval.features`), images quantised to uint8 (as a saved PNG).
"""
import warnings

import torch
import torch.nn as nn
from torchmetrics import Metric
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image import FrechetInceptionDistance, InceptionScore, KernelInceptionDistance

from ldm.eval.features import LogitsView

BT601_Y = (65.481, 128.553, 24.966)  # RGB [0, 1] -> Y [16, 235] weights (ITU-R BT.601, studio swing)

METRIC_DEFINITIONS = {
    "psnr": "per-image 10*log10(1/MSE) on RGB in [0,1], mean over images",
    "ssim": "per-image SSIM (torchmetrics, Gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03, data range 1), "
            "mean over RGB channels and images",
    "psnr_y": "PSNR on BT.601 Y = (16 + 65.481 R + 128.553 G + 24.966 B)/255 from RGB in [0,1], data range 1",
    "ssim_y": "SSIM on the same BT.601 Y channel, data range 1",
    "lpips": "lpips package distance on [-1,1] inputs, mean over images",
    "lpips_random_trunk": "the same with a randomly initialised VGG trunk (offline stand-in for LPIPS; its "
                          "calibrated heads expect ImageNet features, so not comparable with published LPIPS)",
    "fid": "torchmetrics FrechetInceptionDistance on the named extractor's features, uint8 images",
    "kid": "torchmetrics KernelInceptionDistance (cubic polynomial kernel) mean/std over subsets",
    "is": "torchmetrics InceptionScore on the named extractor's logits (generated images only), 10 splits",
}


def to_unit(x: torch.Tensor, where: str = "images") -> torch.Tensor:
    """[-1, 1] images (B, 3, H, W) -> [0, 1] (clamped); other shapes are an error naming `where`."""
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"{where}: expected float images (B, 3, H, W) in [-1, 1], got {x.dtype} {tuple(x.shape)}")
    return ((x + 1) / 2).clamp(0, 1)


def rgb_to_y(x01: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) BT.601 luma in [16/255, 235/255]."""
    w = x01.new_tensor(BT601_Y).view(1, 3, 1, 1)
    return (16.0 + (x01 * w).sum(1, keepdim=True)) / 255.0


def _prepare(pred: torch.Tensor, target: torch.Tensor, y_channel: bool, crop_border: int) -> tuple:
    if pred.shape != target.shape:
        raise ValueError(f"metrics: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    p, t = to_unit(pred, "pred").double(), to_unit(target, "target").double()
    if y_channel:
        p, t = rgb_to_y(p), rgb_to_y(t)
    if crop_border:
        if 2 * crop_border >= min(p.shape[-2:]):
            raise ValueError(f"metrics: crop_border={crop_border} leaves nothing of {tuple(p.shape[-2:])} images")
        p, t = (v[..., crop_border:-crop_border, crop_border:-crop_border] for v in (p, t))
    return p, t


def psnr(pred: torch.Tensor, target: torch.Tensor, y_channel: bool = False, crop_border: int = 0) -> torch.Tensor:
    """Per-image PSNR in dB (B,) on [0, 1] values (data range 1); +inf where the images are identical."""
    p, t = _prepare(pred, target, y_channel, crop_border)
    mse = (p - t).square().flatten(1).mean(1)  # (B,)
    return (10 * torch.log10(1.0 / mse)).float()


def ssim(pred: torch.Tensor, target: torch.Tensor, y_channel: bool = False, crop_border: int = 0) -> torch.Tensor:
    """Per-image SSIM (B,) (Gaussian 11x11, sigma 1.5, data range 1); 1 where the images are identical."""
    p, t = _prepare(pred, target, y_channel, crop_border)
    return structural_similarity_index_measure(p, t, data_range=1.0, reduction="none").float()


def lpips_distance(lpips_net: nn.Module, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS (B,) of [-1, 1] images with a module from `build_lpips`."""
    if pred.shape != target.shape:
        raise ValueError(f"lpips_distance: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    with torch.no_grad():
        return lpips_net(pred, target).flatten()  # (B, 1, 1, 1) -> (B,)


class ReconstructionMetrics(Metric):
    """Accumulates per-image PSNR, SSIM (and LPIPS when `lpips_net` is given) over batches; means at compute.

    Keys: psnr, ssim, lpips, or psnr_y, ssim_y, lpips with y_channel=True (LPIPS stays on RGB).
    """
    full_state_update = False

    def __init__(self, lpips_net: nn.Module | None = None, y_channel: bool = False, crop_border: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.lpips_net, self.y_channel, self.crop_border = lpips_net, y_channel, crop_border
        suffix = "_y" if y_channel else ""
        self.keys = [f"psnr{suffix}", f"ssim{suffix}"] + (["lpips"] if lpips_net is not None else [])
        for key in self.keys:
            self.add_state(f"sum_{key}", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        values = [psnr(pred, target, self.y_channel, self.crop_border),
                  ssim(pred, target, self.y_channel, self.crop_border)]
        if self.lpips_net is not None:
            values.append(lpips_distance(self.lpips_net, pred, target))
        for key, value in zip(self.keys, values):
            setattr(self, f"sum_{key}", getattr(self, f"sum_{key}") + value.double().sum())
        self.count += pred.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise RuntimeError("ReconstructionMetrics.compute: no images were given to update()")
        return {key: (getattr(self, f"sum_{key}") / self.count).float() for key in self.keys}


class GenerativeMetrics(nn.Module):
    """FID, KID and (when the extractor has logits) IS on one feature extractor, accumulated over batches.

    update(images, real) takes [-1, 1] images; real ones feed FID/KID, generated ones feed all three.
    compute() -> {fid, kid_mean, kid_std, kid_subset_size, is_mean, is_std} for the enabled metrics; KID's
    subset size is min(kid_subset_size, samples per side) so small validation sets work (the value used
    is returned). reset_real_features=False keeps the real statistics across reset() (a fixed reference).
    As an attribute of a LightningModule it adds the extractor's weights to the checkpoint; keep it out
    of the module's state (e.g. build it in on_validation_start) where checkpoints must load strictly.
    """

    def __init__(self, extractor: nn.Module, fid: bool = True, kid: bool = True, inception_score: bool = True,
                 kid_subsets: int = 100, kid_subset_size: int = 1000, is_splits: int = 10,
                 reset_real_features: bool = True):
        super().__init__()
        for attr in ("name", "num_features", "weights_sha256"):
            if not hasattr(extractor, attr):
                raise ValueError(f"GenerativeMetrics: extractor {type(extractor).__name__} lacks `{attr}` "
                                 f"(use ldm.eval.features.build_feature_extractor)")
        self.extractor_name, self.extractor_sha256 = extractor.name, extractor.weights_sha256
        self.kid_subset_size = kid_subset_size
        self.fid = FrechetInceptionDistance(feature=extractor, reset_real_features=reset_real_features) if fid else None
        has_logits = getattr(extractor, "logits", None) is not None
        with warnings.catch_warnings():  # KID/IS warn that they keep every feature: known, (N, D) is small here
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            self.kid = KernelInceptionDistance(feature=extractor, subsets=kid_subsets, subset_size=kid_subset_size,
                                               reset_real_features=reset_real_features) if kid else None
            self.inception_score = (InceptionScore(feature=LogitsView(extractor), splits=is_splits)
                                    if inception_score and has_logits else None)

    def update(self, images: torch.Tensor, real: bool) -> None:
        imgs = (to_unit(images, "GenerativeMetrics.update") * 255).round().to(torch.uint8)  # (B, 3, H, W)
        for metric in (self.fid, self.kid):
            if metric is not None:
                metric.update(imgs, real=real)
        if self.inception_score is not None and not real:
            self.inception_score.update(imgs)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.fid is not None:
            out["fid"] = float(self.fid.compute())
        if self.kid is not None:
            n = min(sum(len(f) for f in self.kid.real_features), sum(len(f) for f in self.kid.fake_features))
            self.kid.subset_size = min(self.kid_subset_size, n)
            kid_mean, kid_std = self.kid.compute()
            out.update(kid_mean=float(kid_mean), kid_std=float(kid_std), kid_subset_size=self.kid.subset_size)
        if self.inception_score is not None:
            is_mean, is_std = self.inception_score.compute()
            out.update(is_mean=float(is_mean), is_std=float(is_std))
        return out

    def reset(self) -> None:
        for metric in (self.fid, self.kid, self.inception_score):
            if metric is not None:
                metric.reset()

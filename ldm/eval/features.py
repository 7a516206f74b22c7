"""Feature extractors for FID / KID / Inception Score, pluggable into torchmetrics' `feature=` argument.

Input format (both extractors): images (B, 3, H, W) either uint8 in [0, 255] or floating in [0, 1].
torchmetrics hands a custom `feature=` module the tensor it was given (FID/KID, any `normalize`), or
`(imgs * 255).byte()` (InceptionScore with normalize=True); `GenerativeMetrics` always feeds uint8
(images quantised as if saved to PNG). Every extractor has `name`, `num_features` (so torchmetrics
does not probe it with a dummy image), `weights_sha256` (for the protocol record) and `logits()`
when it has a classifier head (for the Inception Score), else `logits = None`.

- "inception": torch-fidelity's InceptionV3 port of the original TF FID network (TF1-style bilinear
  resize to 299, pool3 2048-d features, 1008 unbiased logits): the standard FID/KID/IS protocol.
  Offline it needs its weights file placed by hand (`inception_weights_path()` says where).
- "probe": the Shapes probe's 128-d penultimate features ("probe-FID") and its 4 class logits
  ("probe-IS"): a named offline alternative for 32x32 Shapes images, not comparable to Inception FID.
"""
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.eval.probe import IMAGE_SIZE, ProbeSettings, ShapesProbe, file_sha256, load_or_train_probe

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
EXTRACTORS = ("inception", "probe")


def as_unit_float(imgs: torch.Tensor, where: str) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images (B, 3, H, W) -> float [0, 1]; anything else is an error naming `where`."""
    if imgs.dim() != 4 or imgs.shape[1] != 3:
        raise ValueError(f"{where}: images must be (B, 3, H, W), got shape {tuple(imgs.shape)}")
    if imgs.dtype == torch.uint8:
        return imgs.float() / 255.0
    if not imgs.is_floating_point():
        raise ValueError(f"{where}: images must be uint8 in [0, 255] or float in [0, 1], got dtype {imgs.dtype}")
    if imgs.numel() and (imgs.min() < 0 or imgs.max() > 1):
        raise ValueError(f"{where}: float images must lie in [0, 1] (got range [{imgs.min().item():.3f}, "
                         f"{imgs.max().item():.3f}]); map [-1, 1] images with (x + 1) / 2")
    return imgs


def as_uint8(imgs: torch.Tensor, where: str) -> torch.Tensor:
    """uint8 or float [0, 1] images -> uint8 [0, 255] (rounded)."""
    unit = as_unit_float(imgs, where)  # validates shape and range
    return imgs if imgs.dtype == torch.uint8 else unit.mul(255).round().to(torch.uint8)


def inception_weights_path(weights_path: str | os.PathLike | None = None) -> Path:
    """`weights_path` if given, else torch.hub.get_dir()/checkpoints/INCEPTION_FILE."""
    if weights_path is not None:
        return Path(weights_path)
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


class InceptionFeatures(nn.Module):
    """torch-fidelity's FID InceptionV3: pool3 features (B, 2048) and unbiased logits (B, 1008); never downloads."""

    num_features = 2048

    def __init__(self, weights_path: str | os.PathLike | None = None):
        super().__init__()
        path = inception_weights_path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"InceptionFeatures: the FID Inception weights file {path} does not exist. Download "
                f"{INCEPTION_URL} on a machine with internet and place it at {path} "
                f"(folder = torch.hub.get_dir()/checkpoints; set TORCH_HOME to move it), or pass "
                f"weights_path=<file>; offline on Shapes, use the 'probe' extractor instead.")
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError("InceptionFeatures needs the `torch-fidelity` package "
                                      "(pip install torch-fidelity), or use the 'probe' extractor") from err
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(path))
        self.net.requires_grad_(False)
        self.name = "inception-v3-compat/pool3-2048 (torch-fidelity, TF1 bilinear resize to 299)"
        self.weights_sha256 = file_sha256(path)

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)  # frozen metric network: always eval

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.net(as_uint8(imgs, "InceptionFeatures"))[0]  # (B, 2048)

    def logits(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.net(as_uint8(imgs, "InceptionFeatures"))[1]  # (B, 1008)


class ProbeFeatures(nn.Module):
    """The Shapes probe as a metric network: penultimate features (B, D) and class logits (B, 4).

    Images of another size are resized to 32x32 (bilinear, antialiased) before the probe.
    """

    def __init__(self, probe: ShapesProbe, name: str = "shapes-probe", weights_sha256: str = ""):
        super().__init__()
        self.probe = probe.eval().requires_grad_(False)
        self.num_features = probe.feature_dim
        self.name, self.weights_sha256 = name, weights_sha256

    def train(self, mode: bool = True) -> "ProbeFeatures":
        return super().train(False)  # BatchNorm must keep its running statistics

    def _prepare(self, imgs: torch.Tensor) -> torch.Tensor:
        x = as_unit_float(imgs, "ProbeFeatures") * 2 - 1  # (B, 3, H, W) in [-1, 1]
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.probe.features(self._prepare(imgs))  # (B, D)

    def logits(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.probe.class_head(self.forward(imgs))  # (B, 4)


class LogitsView(nn.Module):
    """An extractor's `logits()` as a module's forward, for torchmetrics' InceptionScore(feature=...)."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        if getattr(extractor, "logits", None) is None:
            raise ValueError(f"LogitsView: extractor {getattr(extractor, 'name', type(extractor).__name__)!r} "
                             f"has no logits(); the Inception Score needs a classifier head")
        self.extractor = extractor

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.extractor.logits(imgs)


def build_feature_extractor(name: str, weights_path: str | os.PathLike | None = None,
                            cache_dir: str | os.PathLike | None = None,
                            probe_settings: ProbeSettings = ProbeSettings(), strict: bool = True) -> nn.Module:
    """'inception' (weights_path: its .pth) or 'probe' (cached under cache_dir, trained when missing)."""
    if name == "inception":
        return InceptionFeatures(weights_path)
    if name == "probe":
        cached = load_or_train_probe(probe_settings, cache_dir=cache_dir, strict=strict)
        return ProbeFeatures(cached.model, name=cached.name, weights_sha256=cached.sha256)
    raise ValueError(f"build_feature_extractor: name must be one of {EXTRACTORS}, got {name!r}")

"""The Shapes probe: a small CNN that reads the dominant (largest) object's shape, colour and box.

Trained once on real Shapes images (validation split held out), deterministic under its seed, and
cached under `probe_cache_dir()` in a file keyed by its settings. Its held-out accuracy is stored
with the weights; `check_probe_accuracy` refuses (or warns) when an attribute is below the bar, so
evaluation verdicts ("requested class", "colour and shape both right", "centre inside the requested
box") only count from a probe that reads real images correctly.

The bar is checked on all held-out images: Shapes makes the dominant object's square at least
MIN_DOMINANCE (1.25) times any other's, so the labelled object is visible as the largest. Rates on the
"clear" subset (alone, or the dominant box side >= CLEAR_RATIO x the runner-up's) are reported beside.

Training images are degraded at random (Gaussian blur of std up to `blur_max` px, pixel noise up to
`noise_max`) so that the verdicts judge what an object is, not how crisp its edges are: a probe trained
on sharp renders only (version 2) read a circle blurred by 1 px as a square. The report states the
rates on held-out images blurred by 1 px (`*_blur1`) beside the clean ones.
"""
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.data.shapes import COLORS, SHAPE_CLASSES, Shapes

PROBE_VERSION = 3        # part of the cache key: bump when the network or the training recipe changes
ACCURACY_BAR = 0.98      # each checked attribute must reach this on held-out real images
CLEAR_RATIO = 1.1        # "clear" image: one object, or the dominant box's longer side >= 1.1x any other's
CHECKED = ("class", "color", "centre_in_box")  # the bar's attributes (all images); box_iou is stated only
IMAGE_SIZE = 32
GRID = 8                 # the dominant object's centre is classified into GRID x GRID cells (4 px at 32 px)


class ProbeAccuracyError(RuntimeError):
    """The probe reads real images too poorly for its verdicts to count."""


@dataclass(frozen=True)
class ProbeSettings:
    """Everything that determines the probe's weights; its hash keys the cache file."""
    seed: int = 0              # weight init and batch order
    data_seed: int = 0         # Shapes seed of both splits
    max_objects: int = 2       # objects per image (the dominant one has a distractor)
    train_length: int = 20000  # training images (Shapes "train" split)
    val_length: int = 2000     # held-out images (Shapes "validation" split)
    epochs: int = 8
    batch_size: int = 128
    lr: float = 2e-3           # Adam, cosine decay to 0
    box_weight: float = 5.0    # weight of the L1 box loss against the two cross-entropies
    width: int = 16            # channels of the first conv (then 2x, 4x, 4x)
    feature_dim: int = 128     # penultimate features (the probe-FID feature space)
    blur_max: float = 1.2      # training images: Gaussian blur, std ~ U(0, blur_max) px (0: none)
    noise_max: float = 0.05    # training images: + N(0, s^2) noise, s ~ U(0, noise_max) (images in [-1, 1])

    def key(self) -> str:
        """Short hash of the settings and PROBE_VERSION."""
        text = json.dumps({"version": PROBE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


class ShapesProbe(nn.Module):
    """(B, 3, 32, 32) images in [-1, 1] -> dominant object's class/colour logits, box, features."""

    def __init__(self, width: int = 16, feature_dim: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(_conv(3, w), nn.MaxPool2d(2),           # 32 -> 16
                                  _conv(w, 2 * w), nn.MaxPool2d(2),       # 16 -> 8
                                  _conv(2 * w, 4 * w), nn.MaxPool2d(2),   # 8 -> 4
                                  _conv(4 * w, 4 * w))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, feature_dim), nn.ReLU())
        self.class_head = nn.Linear(feature_dim, len(SHAPE_CLASSES))
        self.color_head = nn.Linear(feature_dim, len(COLORS))
        self.box_head = nn.Linear(feature_dim, 4)
        self.centre_head = nn.Linear(feature_dim, GRID * GRID)
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"ShapesProbe: images must be (B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) in [-1, 1], "
                             f"got shape {tuple(x.shape)}")
        return self.fc(self.body(x))  # (B, 4w, 4, 4) -> (B, feature_dim)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)                                  # (B, D)
        return {"class_logits": self.class_head(h),           # (B, 4)
                "color_logits": self.color_head(h),           # (B, 4)
                "box": torch.sigmoid(self.box_head(h)),       # (B, 4) x0, y0, x1, y1 in [0, 1]
                "centre_logits": self.centre_head(h),         # (B, GRID * GRID) row-major cells
                "features": h}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hard verdicts: class (B,), color (B,), box (B, 4), centre (B, 2): the most likely cell's centre.

        The centre is classified, not regressed, so an unsure probe picks one object instead of a
        point between two.
        """
        out = self(x)
        cell = out["centre_logits"].argmax(1)  # (B,)
        centre = torch.stack([cell % GRID, cell // GRID], 1).float().add(0.5).div(GRID)  # (B, 2) x, y
        return {"class": out["class_logits"].argmax(1), "color": out["color_logits"].argmax(1),
                "box": out["box"], "centre": centre}


def centre_cell(box: torch.Tensor) -> torch.Tensor:
    """(B, 4) boxes -> (B,) row-major index of the GRID cell holding each box's centre."""
    centre = ((box[:, :2] + box[:, 2:]) / 2 * GRID).long().clamp(0, GRID - 1)  # (B, 2) column, row
    return centre[:, 1] * GRID + centre[:, 0]


def centre_in_box(centre: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """(B, 2) points and (B, 4) boxes (x0, y0, x1, y1) -> (B,) bool: point inside its box (edges included)."""
    x, y = centre.unbind(1)
    return (x >= box[:, 0]) & (x <= box[:, 2]) & (y >= box[:, 1]) & (y <= box[:, 3])


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise IoU of (B, 4) boxes (x0, y0, x1, y1) -> (B,)."""
    w = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    h = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = w * h
    return inter / (_area(a) + _area(b) - inter).clamp(min=1e-12)


def _area(box: torch.Tensor) -> torch.Tensor:
    return (box[:, 2] - box[:, 0]).clamp(min=0) * (box[:, 3] - box[:, 1]).clamp(min=0)  # (B,)


def render_split(split: str, length: int, settings: ProbeSettings, num_workers: int = 0) -> dict[str, torch.Tensor]:
    """Render Shapes images once: uint8 images (N, 3, 32, 32) and the dominant object's class, colour, box."""
    data = Shapes(split=split, size=IMAGE_SIZE, length=length, seed=settings.data_seed,
                  max_objects=settings.max_objects)
    loader = torch.utils.data.DataLoader(data, batch_size=256, num_workers=num_workers)
    parts: dict[str, list[torch.Tensor]] = {"image": [], "class": [], "color": [], "box": [], "dominance": []}
    for batch in loader:
        parts["image"].append(((batch["image"] + 1) * 127.5).round().to(torch.uint8))  # exact inverse of to_tensor
        parts["class"].append(batch["class_label"])
        parts["color"].append(batch["color_label"])
        parts["box"].append(batch["objects"][:, 0, 1:])  # row 0 is the largest object
        parts["dominance"].append(dominance(batch["objects"]))
    return {k: torch.cat(v) for k, v in parts.items()}


def dominance(objects: torch.Tensor) -> torch.Tensor:
    """(B, N, 5) object rows, largest first -> (B,) longer box side of row 0 over the longest other (inf if alone)."""
    boxes = objects[..., 1:]
    side = torch.maximum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])  # (B, N)
    others = side[:, 1:].masked_fill(objects[:, 1:, 0] < 0, 0).amax(1)                # (B,) 0 when alone
    return side[:, 0] / others


def _as_input(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Blur each image of x (B, C, H, W) with its own Gaussian std sigma (B,) in pixels (0: unchanged)."""
    b, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)           # (K,)
    s = sigma.to(x).clamp_min(1e-3)[:, None]                                              # (B, 1)
    k = torch.exp(-0.5 * (offsets[None] / s) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)                             # (B*C, K)
    y = F.pad(x.reshape(1, b * c, h, w), [radius] * 4, mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)                                   # along x
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)                                   # along y
    return y.reshape(b, c, h, w)


def degrade(x: torch.Tensor, blur_max: float, noise_max: float, generator: torch.Generator) -> torch.Tensor:
    """Random blur and noise per image of x (B, 3, H, W) in [-1, 1], drawn from `generator`."""
    u = torch.rand(2, len(x), generator=generator)                                       # (2, B)
    if blur_max > 0:
        x = gaussian_blur(x, u[0] * blur_max)
    if noise_max > 0:
        noise = torch.randn(x.shape, generator=generator)
        x = x + noise * (u[1] * noise_max)[:, None, None, None]
    return x.clamp(-1, 1)


def _loss(probe: ShapesProbe, batch: dict[str, torch.Tensor], settings: ProbeSettings,
          generator: torch.Generator) -> torch.Tensor:
    out = probe(degrade(_as_input(batch["image"]), settings.blur_max, settings.noise_max, generator))
    return (F.cross_entropy(out["class_logits"], batch["class"])
            + F.cross_entropy(out["color_logits"], batch["color"])
            + F.cross_entropy(out["centre_logits"], centre_cell(batch["box"]))
            + settings.box_weight * F.l1_loss(out["box"], batch["box"]))


def train_probe(settings: ProbeSettings, train: dict[str, torch.Tensor],
                log: Callable[[str], None] | None = None) -> ShapesProbe:
    """Adam with cosine decay over `settings.epochs` passes of `train`; identical weights for identical inputs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        probe = ShapesProbe(settings.width, settings.feature_dim)
    order = torch.Generator().manual_seed(settings.seed)
    augment = torch.Generator().manual_seed(settings.seed + 1)
    n = len(train["class"])
    steps_per_epoch = math.ceil(n / settings.batch_size)
    opt = torch.optim.Adam(probe.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.epochs * steps_per_epoch)
    probe.train()
    for epoch in range(settings.epochs):
        perm, total = torch.randperm(n, generator=order), 0.0
        for start in range(0, n, settings.batch_size):
            idx = perm[start:start + settings.batch_size]
            loss = _loss(probe, {k: v[idx] for k, v in train.items()}, settings, augment)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if log:
            log(f"probe epoch {epoch + 1}/{settings.epochs}: loss {total / n:.4f}")
    return probe.eval()


@torch.no_grad()
def evaluate_probe(probe: ShapesProbe, data: dict[str, torch.Tensor], batch_size: int = 500) -> dict[str, float]:
    """Held-out rates on all images and on the clear ones (suffix `_clear`, share in `clear_fraction`).

    class, color, class_and_color: the dominant object's attributes; centre_in_box: predicted centre
    inside the true box; box_iou: mean IoU of the regressed box (stated, not checked). `<attribute>_blur1`:
    the same rates on the images blurred by a Gaussian of std 1 px (robustness, not checked).
    """
    report = _rates(probe, data, batch_size, blur=0.0)
    blurred = _rates(probe, data, batch_size, blur=1.0)
    report.update({f"{k}_blur1": blurred[k] for k in CHECKED})
    return report


def _rates(probe: ShapesProbe, data: dict[str, torch.Tensor], batch_size: int, blur: float) -> dict[str, float]:
    probe.eval()
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("class", "color", "class_and_color", "centre_in_box",
                                                           "box_iou")}
    for start in range(0, len(data["class"]), batch_size):
        sl = slice(start, start + batch_size)
        images = _as_input(data["image"][sl])
        pred = probe.predict(gaussian_blur(images, torch.full((len(images),), blur)) if blur else images)
        cls_ok, col_ok = pred["class"] == data["class"][sl], pred["color"] == data["color"][sl]
        rows["class"].append(cls_ok)
        rows["color"].append(col_ok)
        rows["class_and_color"].append(cls_ok & col_ok)
        rows["centre_in_box"].append(centre_in_box(pred["centre"], data["box"][sl]))
        rows["box_iou"].append(box_iou(pred["box"], data["box"][sl]))
    clear = data["dominance"] >= CLEAR_RATIO
    report = {"clear_fraction": clear.float().mean().item()}
    for key, parts in rows.items():
        values = torch.cat(parts).float()
        report[key], report[f"{key}_clear"] = values.mean().item(), values[clear].mean().item()
    return report


def check_probe_accuracy(report: dict[str, float], bar: float = ACCURACY_BAR, strict: bool = True) -> bool:
    """True when every CHECKED attribute reaches `bar`; otherwise raise ProbeAccuracyError (strict) or warn."""
    low = {k: report[k] for k in CHECKED if not report[k] >= bar}  # NaN (empty subset) fails too
    if not low:
        return True
    msg = (f"Shapes probe below the {bar:.0%} held-out accuracy bar on {sorted(low)} "
           f"(report: {', '.join(f'{k}={v:.4f}' for k, v in report.items())}); its verdicts do not count. "
           f"Retrain with more data/epochs (scripts/train_probe.py).")
    if strict:
        raise ProbeAccuracyError(msg)
    warnings.warn(msg, stacklevel=2)
    return False


def probe_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir` if given, else $LDM_CACHE/probe, else ~/.cache/ldm/probe."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("LDM_CACHE")
    return Path(root) / "probe" if root else Path.home() / ".cache" / "ldm" / "probe"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class CachedProbe:
    """A trained probe with where it lives, its file's SHA-256, its settings and held-out report."""
    model: ShapesProbe
    settings: ProbeSettings
    report: dict[str, float]
    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return f"shapes-probe-{self.settings.key()}"


def _train_and_save(settings: ProbeSettings, path: Path, num_workers: int, log: Callable[[str], None]) -> None:
    t0 = time.perf_counter()
    train = render_split("train", settings.train_length, settings, num_workers)
    val = render_split("validation", settings.val_length, settings, num_workers)
    log(f"probe data rendered in {time.perf_counter() - t0:.1f}s")
    probe = train_probe(settings, train, log)
    report = evaluate_probe(probe, val)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"version": PROBE_VERSION, "settings": asdict(settings), "report": report,
                "train_seconds": time.perf_counter() - t0, "state_dict": probe.state_dict()}, tmp)
    os.replace(tmp, path)  # atomic: concurrent readers never see half a file


def load_or_train_probe(settings: ProbeSettings = ProbeSettings(), cache_dir: str | os.PathLike | None = None,
                        retrain: bool = False, strict: bool = True, num_workers: int = 2,
                        log: Callable[[str], None] = print) -> CachedProbe:
    """The cached probe for `settings` (trained and cached first when missing), checked against the bar."""
    path = probe_cache_dir(cache_dir) / f"shapes-probe-{settings.key()}.pt"
    if retrain or not path.exists():
        log(f"training the Shapes probe ({settings}) -> {path}")
        _train_and_save(settings, path, num_workers, log)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("version") != PROBE_VERSION or blob.get("settings") != asdict(settings):
        raise ValueError(f"probe cache file {path} does not hold a version-{PROBE_VERSION} probe for {settings}; "
                         f"delete it or pass retrain=True")
    model = ShapesProbe(settings.width, settings.feature_dim)
    model.load_state_dict(blob["state_dict"])
    model.eval().requires_grad_(False)
    check_probe_accuracy(blob["report"], strict=strict)
    return CachedProbe(model, settings, blob["report"], path, file_sha256(path))

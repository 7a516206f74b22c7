"""Tiled processing of images of any size: the tile grid, Gaussian blending weights, a tiled denoiser, tiled
first-stage decode / encode, and a seam measure.

Grid (StableSR, sec. "aggregation sampling"): tiles of `tile` pixels at 0, stride, 2 stride, ... with
stride = tile - overlap and the last tile snapped to the border, so every tile has the same size
(min(tile, side)) and every pixel is covered. Each tile's output is weighted by a separable Gaussian with
sigma = 0.1 tile; the sum is divided by the summed weights. StableSR's released window centres x on
(T - 1) / 2 but y on T / 2 (`centres="released"`, the default); `centres="symmetric"` uses (T - 1) / 2 for both.

    TiledDenoiser(model, tile=64, overlap=32)   the sampler's denoiser `model(x, t, **cond)` run per latent
                                                tile, spatial conditions cropped alike; predictions blended
    tiled_decode(decode, z, tile, overlap)      latent tiles -> pixel tiles (f times larger), blended in pixels;
                                                `extra=` spatial inputs (CFW encoder features) cropped alike
    tiled_encode(encode, x, tile, overlap, f)   pixel tiles -> latent tiles (and features), each blended at its scale

The first-stage functions blend overlapping tiles of one decode / encode; StableSR's released scripts instead
cut 1280-pixel patches and run the whole pipeline on each. Decoder normalisation statistics differ per tile,
so use overlaps of a quarter of the tile or more; `seam_score` measures what is left.
"""
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

CENTRES = ("released", "symmetric")


@dataclass(frozen=True)
class Tile:
    """A rectangle of the grid: rows top..top+height, columns left..left+width."""
    top: int
    left: int
    height: int
    width: int

    def scaled(self, factor: Fraction | int) -> "Tile":
        """The same region on a grid `factor` times finer; an error if it does not land on whole pixels."""
        values = [Fraction(v) * factor for v in (self.top, self.left, self.height, self.width)]
        if any(v.denominator != 1 for v in values):
            raise ValueError(f"tile {self} does not map to whole pixels at scale {factor}")
        return Tile(*(int(v) for v in values))

    def crop(self, x: Tensor) -> Tensor:
        return x[..., self.top:self.top + self.height, self.left:self.left + self.width]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: 0, stride, 2 stride, ..., and the last tile ending at `length`."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """Row-major tiles of min(tile, height) x min(tile, width) covering a height x width image."""
    th, tw = min(tile, height), min(tile, width)
    return [Tile(top, left, th, tw) for top in tile_starts(height, tile, overlap)
            for left in tile_starts(width, tile, overlap)]


def gaussian_weights(height: int, width: int, sigma: float = 0.1, centres: str = "released",
                     device: torch.device | str | None = None) -> Tensor:
    """(height, width) separable Gaussian window, std sigma * side along each axis, peak 1."""
    if centres not in CENTRES:
        raise ValueError(f"centres must be one of {CENTRES}, got {centres!r}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")

    def axis(n: int, centre: float) -> Tensor:
        i = torch.arange(n, dtype=torch.float64, device=device)
        return torch.exp(-((i - centre) ** 2) / (2 * (sigma * n) ** 2))

    y_centre = height / 2 if centres == "released" else (height - 1) / 2
    return (axis(height, y_centre)[:, None] * axis(width, (width - 1) / 2)[None, :]).float()


def coverage(grid: Sequence[Tile], height: int, width: int, weights: Callable[[int, int], Tensor] | None = None
             ) -> Tensor:
    """(height, width) sum over tiles of their weights (ones when `weights` is None): > 0 means covered."""
    total = torch.zeros(height, width)
    for t in grid:
        total[t.top:t.top + t.height, t.left:t.left + t.width] += (
            torch.ones(t.height, t.width) if weights is None else weights(t.height, t.width))
    return total


class TileBlender:
    """Accumulates weighted tile outputs onto a canvas and returns their normalised sum."""

    def __init__(self, sigma: float = 0.1, centres: str = "released"):
        self.sigma, self.centres = sigma, centres
        self.out: Tensor | None = None
        self.total: Tensor | None = None

    def add(self, pred: Tensor, tile: Tile, size: tuple[int, int]) -> None:
        """pred (B, C, tile.height, tile.width) placed at `tile` on a canvas of spatial `size`."""
        if self.out is None:
            self.out = pred.new_zeros(*pred.shape[:2], *size)                  # (B, C, H, W)
            self.total = pred.new_zeros(1, 1, *size)
        w = gaussian_weights(tile.height, tile.width, self.sigma, self.centres, pred.device).to(pred.dtype)
        rows, cols = slice(tile.top, tile.top + tile.height), slice(tile.left, tile.left + tile.width)
        self.out[..., rows, cols] += pred * w
        self.total[..., rows, cols] += w

    def result(self) -> Tensor:
        return self.out / self.total


# ----------------------------------------------------------------------------- conditions of a tile

def crop_condition(c: Any, tile: Tile, size: tuple[int, int], name: str = "cond") -> Any:
    """`c` for one tile: (B, C, h, w) tensors whose h x w is a fixed ratio of the latent `size` are cropped to
    the tile (scaled by that ratio); dicts, lists and tuples are recursed into; anything else is kept."""
    if isinstance(c, dict):
        return {k: crop_condition(v, tile, size, f"{name}[{k!r}]") for k, v in c.items()}
    if isinstance(c, (list, tuple)):
        return type(c)(crop_condition(v, tile, size, f"{name}[{i}]") for i, v in enumerate(c))
    if not isinstance(c, Tensor):
        return c
    if c.ndim == 4:
        ratio = Fraction(c.shape[-2], size[0])
        if ratio == 0 or Fraction(c.shape[-1], size[1]) != ratio:
            raise ValueError(f"TiledDenoiser: condition {name} has spatial size {c.shape[-2]}x{c.shape[-1]}, not a "
                             f"fixed ratio of the latent's {size[0]}x{size[1]}; crop it per tile yourself")
        try:
            c = tile.scaled(ratio).crop(c)
        except ValueError as err:
            raise ValueError(f"TiledDenoiser: condition {name}: {err}; choose tile and overlap divisible by "
                             f"{ratio.denominator}") from err
    return c


class TiledDenoiser:
    """A denoiser `model(x, t, **cond)` evaluated on overlapping latent tiles and blended with Gaussian weights.

    Every tile is cut from x_t (and from each spatial condition, e.g. c_concat or an LR latent in `cond`), the
    model predicts eps / v / x0 for it, and the predictions are averaged with the windows of `gaussian_weights`.
    With one tile covering the latent the result equals the plain model's. `tiles_per_batch` tiles are stacked
    along the batch axis per call (faster, proportionally more memory).
    """

    def __init__(self, model: Callable[..., Tensor], tile: int = 64, overlap: int = 32, tiles_per_batch: int = 1,
                 sigma: float = 0.1, centres: str = "released"):
        tile_starts(tile + 1, tile, overlap)                                  # validates tile and overlap
        if tiles_per_batch < 1:
            raise ValueError(f"TiledDenoiser: tiles_per_batch must be >= 1, got {tiles_per_batch}")
        self.model, self.tile, self.overlap, self.tiles_per_batch = model, tile, overlap, tiles_per_batch
        self.sigma, self.centres = sigma, centres

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        b, _, h, w = x.shape                                                  # (B, C, H, W)
        grid = tile_grid(h, w, self.tile, self.overlap)
        blender = TileBlender(self.sigma, self.centres)
        for i in range(0, len(grid), self.tiles_per_batch):
            group = grid[i:i + self.tiles_per_batch]
            xs = torch.cat([tile.crop(x) for tile in group])                 # (n B, C, th, tw)
            ts = torch.cat([t] * len(group)) if t.ndim else t
            cs = {k: _stack_tiles(v, group, (h, w), b, k) for k, v in cond.items()}
            for tile, pred in zip(group, self.model(xs, ts, **cs).split(b)):
                blender.add(pred, tile, (h, w))                               # pred (B, C_out, th, tw)
        return blender.result()                                               # (B, C_out, H, W)


def _stack_tiles(c: Any, group: Sequence[Tile], size: tuple[int, int], batch: int, name: str) -> Any:
    """The condition of each tile of `group`, stacked along the batch in the order of the x tiles; tensors of
    batch B that are not spatial (cross-attention context, class vectors) are repeated once per tile."""
    parts = [crop_condition(c, tile, size, name) for tile in group]
    return parts[0] if len(group) == 1 else _concat(parts, batch)


def _concat(parts: list[Any], batch: int) -> Any:
    first = parts[0]
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts], batch) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_concat([p[i] for p in parts], batch) for i in range(len(first)))
    if isinstance(first, Tensor) and first.ndim >= 1 and first.shape[0] == batch:
        return torch.cat(parts)
    return first


# ----------------------------------------------------------------------------- first stage

def _tiled_map(fn: Callable[..., Any], x: Tensor, grid: Sequence[Tile], grid_size: tuple[int, int], in_scale: int,
               extra: Any, sigma: float, centres: str) -> Any:
    """fn on each tile of x (grid units times in_scale pixels), with `extra` cropped alike when given; every
    tensor fn returns (a tensor, or a list / tuple / dict of them) is blended on its own canvas, its scale
    inferred from its size against the tile's."""
    blenders: list[TileBlender] | None = None
    spec = None
    for tile in grid:
        args = (tile.scaled(in_scale).crop(x),)
        if extra is not None:
            args += (crop_condition(extra, tile, grid_size, "extra"),)
        leaves, spec = tree_flatten(fn(*args))
        blenders = blenders or [TileBlender(sigma, centres) for _ in leaves]
        for blender, out in zip(blenders, leaves):
            ratio = Fraction(out.shape[-2], tile.height)
            if Fraction(out.shape[-1], tile.width) != ratio or (grid_size[0] * ratio).denominator != 1 \
                    or (grid_size[1] * ratio).denominator != 1:
                raise ValueError(f"tiled first stage: a {tile.height}x{tile.width} tile (grid units) gave an output "
                                 f"of {tuple(out.shape[-2:])}, not a whole multiple of the tile in both axes")
            blender.add(out, tile.scaled(ratio), (int(grid_size[0] * ratio), int(grid_size[1] * ratio)))
    return tree_unflatten([b.result() for b in blenders], spec)


def tiled_decode(decode: Callable[..., Any], z: Tensor, tile: int = 64, overlap: int = 16, extra: Any = None,
                 sigma: float = 0.1, centres: str = "released") -> Any:
    """decode(z) over tile x tile latent tiles (overlap in latent pixels), blended at the output's scale:
    (B, C, h, w) -> (B, C_img, h f, w f). With `extra` (e.g. CFW's encoder features, any spatial tensors at a
    fixed ratio of z), decode(z_tile, extra_tile) is called with them cropped to the tile."""
    grid = tile_grid(z.shape[-2], z.shape[-1], tile, overlap)
    return _tiled_map(decode, z, grid, tuple(z.shape[-2:]), 1, extra, sigma, centres)


def tiled_encode(encode: Callable[[Tensor], Any], x: Tensor, tile: int = 512, overlap: int = 128, factor: int = 8,
                 sigma: float = 0.1, centres: str = "released") -> Any:
    """encode(x) over tile x tile pixel tiles (tile, overlap and x's size multiples of the downsampling `factor`),
    each output blended at its own scale: (B, 3, H, W) -> (B, C, H / f, W / f), or a structure of tensors such as
    Encoder(x, return_features=True). Blend a deterministic map (a KL posterior's moments, then sample), not
    samples: averaging samples shrinks their variance in the overlaps."""
    h, w = x.shape[-2:]
    if h % factor or w % factor or tile % factor or overlap % factor:
        raise ValueError(f"tiled_encode: image {h}x{w}, tile {tile} and overlap {overlap} must be multiples of "
                         f"the factor {factor}")
    grid = tile_grid(h // factor, w // factor, tile // factor, overlap // factor)
    return _tiled_map(encode, x, grid, (h // factor, w // factor), factor, None, sigma, centres)


# ----------------------------------------------------------------------------- seams

def tile_borders(grid: Sequence[Tile], height: int, width: int, factor: int = 1) -> tuple[list[int], list[int]]:
    """Interior rows and columns (times `factor`) where some tile starts or ends: (ys, xs)."""
    ys = {v for t in grid for v in (t.top, t.top + t.height)} - {0, height}
    xs = {v for t in grid for v in (t.left, t.left + t.width)} - {0, width}
    return sorted(y * factor for y in ys), sorted(x * factor for x in xs)


def seam_score(img: Tensor, ys: Sequence[int], xs: Sequence[int], reach: int = 2) -> float:
    """Mean |jump| between pixel rows y-1, y (y in ys) and columns x-1, x (x in xs), divided by the mean |jump|
    between the rows / columns 1..reach pixels beside each border (inside the tiles): about 1 without seams,
    larger with them. Comparing with the neighbours keeps the score near 1 where the image's gradient varies."""
    dx = (img[..., :, 1:] - img[..., :, :-1]).abs().flatten(0, -3).mean(dim=(0, 1))   # (W - 1,): between x-1, x
    dy = (img[..., 1:, :] - img[..., :-1, :]).abs().flatten(0, -3).mean(dim=(0, 2))   # (H - 1,)
    border, beside = [], []
    for jumps, positions in ((dx, xs), (dy, ys)):
        seams = {p - 1 for p in positions}                   # index of the jump across each border
        for j in sorted(seams):
            border.append(jumps[j])
            near = [j + d for d in range(-reach, reach + 1)
                    if d and 0 <= j + d < len(jumps) and j + d not in seams]
            beside.extend(jumps[k] for k in near)
    if not border or not beside:
        raise ValueError("seam_score: no borders given (one tile covers the image)")
    return float(torch.stack(border).mean() / torch.stack(beside).mean().clamp_min(1e-12))

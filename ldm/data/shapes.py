"""Shapes: a procedural dataset of coloured geometric shapes with captions, boxes and masks.

Every sample is a pure function of (seed, split, index). Shapes are drawn at 4x resolution and
box-filtered down, so edges are anti-aliased; backgrounds are muted (low saturation) light or
dark solids or gentle gradients, never close to a shape colour. Captions name size, colour,
shape and relative position ("a large red circle above a small blue square").
"""
import colorsys
import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ldm.data.transforms import pad_objects, to_tensor

SHAPE_CLASSES = ("circle", "square", "triangle", "star")
COLORS = ("red", "green", "blue", "yellow")
COLOR_RGB = {"red": (214, 40, 40), "green": (36, 158, 62), "blue": (40, 86, 224), "yellow": (240, 206, 40)}
SIZES = ("small", "large")
SIZE_RANGE = {"small": (0.22, 0.30), "large": (0.40, 0.48)}  # side of an object's square, fraction of the image
MIN_DOMINANCE = 1.25  # the largest object's square side over every other's: the labelled object is visibly largest
DEFAULT_HOLDOUT_PAIRS = (("red", "triangle"), ("blue", "circle"))
SPLITS = {"train": 0, "validation": 1, "test": 2}  # mixed into the seed: splits never share a stream
MAX_OBJECTS = 4       # more do not reliably fit without overlap
SUPERSAMPLE = 4       # draw at 4x, then box-filter down
MARGIN, GAP = 0.03, 0.04  # free border of the image and between objects (fractions of the side)
COLOR_JITTER = 12     # +- per RGB channel around the named colour


@dataclass(frozen=True)
class ShapeObject:
    """One shape: class/colour indices, size word, and its square (centre cx, cy, side extent) in [0, 1]."""
    shape: int
    color: int
    size: str
    extent: float
    cx: float
    cy: float

    @property
    def words(self) -> str:
        return f"{self.size} {COLORS[self.color]} {SHAPE_CLASSES[self.shape]}"

    def square(self) -> tuple[float, float, float, float]:
        r = self.extent / 2
        return self.cx - r, self.cy - r, self.cx + r, self.cy + r

    def outline(self) -> list[tuple[float, float]]:
        """Polygon vertices in [0, 1] image coordinates (a circle returns its square's corners)."""
        r, cx, cy = self.extent / 2, self.cx, self.cy
        name = SHAPE_CLASSES[self.shape]
        if name == "triangle":
            return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
        if name == "star":  # five points, outer radius r, inner radius 0.45 r, one point up
            angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
            radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
            return [(cx + q * math.cos(a), cy + q * math.sin(a)) for q, a in zip(radii, angles)]
        x0, y0, x1, y1 = self.square()
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]

    def box(self) -> tuple[float, float, float, float]:
        """Tight normalised box (x0, y0, x1, y1) of the drawn shape."""
        xs, ys = zip(*self.outline())
        return min(xs), min(ys), max(xs), max(ys)

    def draw(self, canvas: ImageDraw.ImageDraw, side: int) -> None:
        """Fill the shape with 255 on an L-mode canvas of side x side pixels."""
        if SHAPE_CLASSES[self.shape] == "circle":
            canvas.ellipse([v * side for v in self.square()], fill=255)
        else:
            canvas.polygon([(x * side, y * side) for x, y in self.outline()], fill=255)


def separated(a: ShapeObject, b: ShapeObject, gap: float = GAP) -> bool:
    """True when the squares of a and b are at least `gap` apart along x or y."""
    ax0, ay0, ax1, ay1 = a.square()
    bx0, by0, bx1, by1 = b.square()
    return bx0 - ax1 >= gap or ax0 - bx1 >= gap or by0 - ay1 >= gap or ay0 - by1 >= gap


def relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where a lies relative to b, along the axis on which their squares are further apart."""
    ax0, ay0, ax1, ay1 = a.square()
    bx0, by0, bx1, by1 = b.square()
    gap_x, gap_y = max(bx0 - ax1, ax0 - bx1), max(by0 - ay1, ay0 - by1)
    if gap_y >= gap_x:
        return "above" if a.cy < b.cy else "below"
    return "to the left of" if a.cx < b.cx else "to the right of"


def caption(objects: Sequence[ShapeObject]) -> str:
    """English caption; objects[0] (the largest) is the anchor the others are placed against."""
    first = objects[0]
    if len(objects) == 1:
        return f"a {first.words}"
    clauses = [f"a {first.words} {relation(first, objects[1])} a {objects[1].words}"]
    clauses += [f"a {o.words} {relation(o, first)} the {COLORS[first.color]} {SHAPE_CLASSES[first.shape]}"
                for o in objects[2:]]
    return clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]


def pair_indices(pairs: Sequence[Sequence[str]], where: str = "holdout_pairs") -> list[tuple[int, int]]:
    """(colour, shape) names -> (colour index, shape index); unknown names are errors naming them."""
    out = []
    for pair in pairs:
        if len(pair) != 2 or pair[0] not in COLORS or pair[1] not in SHAPE_CLASSES:
            raise ValueError(f"Shapes: {where} entry {tuple(pair)!r} is not a (colour, shape) pair with "
                             f"colour in {COLORS} and shape in {SHAPE_CLASSES}")
        out.append((COLORS.index(pair[0]), SHAPE_CLASSES.index(pair[1])))
    return out


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted light or dark solid colour or gentle linear gradient, float (size, size, 3) in [0, 255]."""
    light = rng.random() < 0.5
    lo, hi = (0.70, 0.90) if light else (0.10, 0.30)

    def muted() -> np.ndarray:
        rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.18), rng.uniform(lo, hi))
        return np.array(rgb) * 255.0

    start = muted()
    if rng.random() < 0.5:
        return np.broadcast_to(start, (size, size, 3)).copy()
    end, angle = muted(), rng.uniform(0, 2 * math.pi)
    grid = (np.arange(size) + 0.5) / size - 0.5
    t = np.cos(angle) * grid[None, :] + np.sin(angle) * grid[:, None]  # (H, W) in [-0.71, 0.71]
    t = (t - t.min()) / (t.max() - t.min())
    return start * (1 - t[..., None]) + end * t[..., None]


def render(objects: Sequence[ShapeObject], bg: np.ndarray, colors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paint the objects with RGB `colors` (n, 3) over `bg` -> (uint8 (H, W, 3), int64 segmentation (H, W))."""
    size = bg.shape[0]
    img, seg = bg.copy(), np.zeros((size, size), np.int64)
    for obj, rgb in zip(objects, colors):
        mask = Image.new("L", (size * SUPERSAMPLE,) * 2, 0)
        obj.draw(ImageDraw.Draw(mask), size * SUPERSAMPLE)
        alpha = np.asarray(mask.reduce(SUPERSAMPLE), np.float64)[..., None] / 255.0  # (H, W, 1) coverage
        img = img * (1 - alpha) + rgb * alpha
        seg[alpha[..., 0] >= 0.5] = obj.shape + 1
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), seg


class Shapes(torch.utils.data.Dataset):
    """Procedural shapes -> {image, class_label, color_label, caption, objects, segmentation}.

    `class_label`/`color_label` describe the largest object, whose square side is at least `min_dominance`
    times every other's (so an image shows which object its labels describe). `holdout="exclude"` never
    draws a (colour, shape) pair of `holdout_pairs`; `holdout="only"` makes the largest object one of them.
    """

    def __init__(self,
                 split: str = "train",                   # "train" | "validation" | "test"
                 size: int = 32,                         # image side in pixels
                 length: int = 10000,                    # samples in the split
                 seed: int = 0,                          # with split and index, fixes every sample
                 min_objects: int = 1,
                 max_objects: int = 2,                   # at most MAX_OBJECTS
                 max_objects_pad: int = 4,               # rows of `objects` (padding class -1)
                 holdout: str | None = None,             # None | "exclude" | "only"
                 holdout_pairs: Sequence[Sequence[str]] = DEFAULT_HOLDOUT_PAIRS,
                 min_dominance: float = MIN_DOMINANCE,      # >= 1; 1 allows equal sizes
                 sizes: Sequence[str] = SIZES):           # size words drawn from ("large": big objects only)
        if split not in SPLITS:
            raise ValueError(f"Shapes: split must be one of {tuple(SPLITS)}, got {split!r}")
        if not 1 <= min_objects <= max_objects <= min(MAX_OBJECTS, max_objects_pad):
            raise ValueError(f"Shapes: need 1 <= min_objects <= max_objects <= min({MAX_OBJECTS}, max_objects_pad), "
                             f"got min_objects={min_objects}, max_objects={max_objects}, "
                             f"max_objects_pad={max_objects_pad}")
        if holdout not in (None, "exclude", "only"):
            raise ValueError(f"Shapes: holdout must be None, 'exclude' or 'only', got {holdout!r}")
        if not min_dominance >= 1:
            raise ValueError(f"Shapes: min_dominance must be >= 1, got {min_dominance}")
        if not sizes or any(word not in SIZE_RANGE for word in sizes):
            raise ValueError(f"Shapes: sizes must be a non-empty list of {list(SIZES)}, got {list(sizes)}")
        if size < 8 or length <= 0:
            raise ValueError(f"Shapes: need size >= 8 and length > 0, got size={size}, length={length}")
        self.split, self.size, self.length, self.seed = split, size, length, seed
        self.min_objects, self.max_objects, self.max_objects_pad = min_objects, max_objects, max_objects_pad
        self.holdout, self.min_dominance, self.sizes = holdout, min_dominance, tuple(sizes)
        held = pair_indices(holdout_pairs)
        every = list(itertools.product(range(len(COLORS)), range(len(SHAPE_CLASSES))))
        kept = [p for p in every if p not in held]
        self.anchor_pairs = {None: every, "exclude": kept, "only": held}[holdout]
        self.other_pairs = kept if holdout == "exclude" else every
        if not self.anchor_pairs or not self.other_pairs:
            raise ValueError(f"Shapes: holdout={holdout!r} with holdout_pairs={list(holdout_pairs)} leaves no pair to draw")

    def __len__(self) -> int:
        return self.length

    def layout(self, rng: np.random.Generator) -> list[ShapeObject]:
        """Non-overlapping objects, largest first; retried with fresh sizes until they fit."""
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        pairs = [self.anchor_pairs] + [self.other_pairs] * (n - 1)
        for _ in range(100):
            sizes = [self.sizes[int(rng.integers(len(self.sizes)))] for _ in range(n)]
            extents = sorted((rng.uniform(*SIZE_RANGE[s]), s) for s in sizes)[::-1]
            if n > 1 and extents[0][0] < self.min_dominance * extents[1][0]:
                continue
            placed: list[ShapeObject] = []
            for (extent, word), pool in zip(extents, pairs):
                color, shape = pool[int(rng.integers(len(pool)))]
                lo, hi = MARGIN + extent / 2, 1 - MARGIN - extent / 2
                for _ in range(30):
                    obj = ShapeObject(shape, color, word, extent, rng.uniform(lo, hi), rng.uniform(lo, hi))
                    if all(separated(obj, other) for other in placed):
                        placed.append(obj)
                        break
            if len(placed) == n:
                return placed
        raise RuntimeError(f"Shapes: could not place {n} objects without overlap")

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.length:
            raise IndexError(f"Shapes index {i} out of range for length {self.length}")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], i])
        objects = self.layout(rng)
        colors = np.array([COLOR_RGB[COLORS[o.color]] for o in objects], np.float64)
        colors = colors + rng.uniform(-COLOR_JITTER, COLOR_JITTER, colors.shape)  # (n, 3)
        img, seg = render(objects, background(rng, self.size), colors)
        rows = [(o.shape, *o.box()) for o in objects]
        return {"image": to_tensor(img),  # (3, H, W)
                "class_label": torch.tensor(objects[0].shape, dtype=torch.int64),
                "color_label": torch.tensor(objects[0].color, dtype=torch.int64),
                "caption": caption(objects),
                "objects": pad_objects(rows, self.max_objects_pad),
                "segmentation": torch.from_numpy(seg)}

"""Image panels for logging: conditions drawn as pictures (captions, class labels, boxes, segmentation maps,
low-resolution images) and grids of image sequences. Every function returns float tensors in [-1, 1]."""
import textwrap
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

MIN_TEXT_PANEL = 128  # text is unreadable on smaller panels; text panels are at least this wide
# distinguishable colours (tab10), one per class index
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def color(k: int) -> tuple[int, int, int]:
    return PALETTE[k % len(PALETTE)]


def first_n(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The first n samples of every tensor / list entry of a batch dict (other entries unchanged)."""
    return {k: v[:n] if isinstance(v, (torch.Tensor, list, tuple)) else v for k, v in batch.items()}


def image_grid(columns: Sequence[torch.Tensor], pad_value: float = 1.0) -> torch.Tensor:
    """K tensors (N, C, H, W) -> one image (1, C, H', W'): row i shows sample i across the K columns."""
    x = torch.stack([c.detach().float().cpu() for c in columns], dim=1)  # (N, K, C, H, W)
    grid = make_grid(x.flatten(0, 1), nrow=len(columns), padding=2, pad_value=pad_value)  # (C, H', W')
    return grid[None]


def from_pil(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size -> (N, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])  # (N, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def _font(side: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, side // 12))


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> str:
    """Greedy word wrap to `width` pixels."""
    chars = max(1, int(width / max(font.getlength("x"), 1.0)))
    return "\n".join(textwrap.wrap(text, width=chars)) if text else ""


def text_panel(texts: Sequence[str], size: Sequence[int]) -> torch.Tensor:
    """Each text word-wrapped in black on white, (N, 3, H, W) with H, W >= MIN_TEXT_PANEL."""
    h, w = (max(s, MIN_TEXT_PANEL) for s in size)
    font, out = _font(w), []
    for text in texts:
        im = Image.new("RGB", (w, h), "white")
        ImageDraw.Draw(im).multiline_text((3, 3), _wrap(str(text), font, w - 6), fill="black", font=font)
        out.append(im)
    return from_pil(out)


def _class_name(k: int, class_names: Sequence[str] | None) -> str:
    return class_names[k] if class_names is not None and 0 <= k < len(class_names) else f"class {k}"


def label_panel(labels: torch.Tensor, size: Sequence[int], class_names: Sequence[str] | None = None) -> torch.Tensor:
    """Class labels (N,) as their names (or "class k")."""
    return text_panel([_class_name(int(k), class_names) for k in labels.tolist()], size)


def boxes_panel(objects: torch.Tensor, size: Sequence[int], class_names: Sequence[str] | None = None) -> torch.Tensor:
    """Layouts (N, n, 5) of rows (class, x0, y0, x1, y1) in [0, 1] (class -1: padding): each box outlined in its
    class colour with the class name, on white."""
    h, w = (max(s, MIN_TEXT_PANEL) for s in size)
    font, out = _font(w), []
    for rows in objects.detach().float().cpu().tolist():
        im = Image.new("RGB", (w, h), "white")
        draw = ImageDraw.Draw(im)
        for k, x0, y0, x1, y1 in rows:
            if k < 0:
                continue
            box = (x0 * (w - 1), y0 * (h - 1), max(x1, x0) * (w - 1), max(y1, y0) * (h - 1))
            draw.rectangle(box, outline=color(int(k)), width=2)
            draw.text((box[0] + 3, box[1] + 2), _class_name(int(k), class_names), fill=color(int(k)), font=font)
        out.append(im)
    return from_pil(out)


def segmentation_panel(seg: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Integer maps (N, H, W): 0 black, class k >= 1 in colour k - 1; resized (nearest) to `size`."""
    palette = torch.tensor(((0, 0, 0),) + PALETTE, dtype=torch.float32) / 127.5 - 1.0   # (1 + P, 3)
    index = seg.detach().long().cpu()
    index = torch.where(index > 0, (index - 1) % len(PALETTE) + 1, torch.zeros_like(index))
    rgb = palette[index].permute(0, 3, 1, 2)                                              # (N, 3, H, W)
    return F.interpolate(rgb, size=tuple(size), mode="nearest")


def image_panel(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Images (N, C, h, w) resized (nearest, so low-resolution pixels stay visible) to `size`: 3 channels as they
    are, 1 channel as grey, other channel counts (one-hot maps) by their argmax as a segmentation map."""
    x = x.detach().float().cpu()
    if x.shape[1] not in (1, 3):
        return segmentation_panel(x.argmax(dim=1) + 1, size)
    x = F.interpolate(x, size=tuple(size), mode="nearest")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def condition_panel(c: Any, size: Sequence[int], class_names: Sequence[str] | None = None) -> torch.Tensor:
    """A raw condition drawn as (N, 3, H', W'): captions as text, labels by name, layouts as boxes, segmentation
    maps coloured, images resized."""
    if isinstance(c, (list, tuple)) and all(isinstance(t, str) for t in c):
        return text_panel(c, size)
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"condition_panel: cannot draw a condition of type {type(c).__name__}")
    if c.ndim == 1 and not c.is_floating_point():
        return label_panel(c, size, class_names)
    if c.ndim == 3 and c.is_floating_point() and c.shape[-1] == 5:
        return boxes_panel(c, size, class_names)
    if c.ndim == 3 and not c.is_floating_point():
        return segmentation_panel(c, size)
    if c.ndim == 4:
        return image_panel(c, size)
    raise ValueError(f"condition_panel: cannot draw a condition of shape {tuple(c.shape)} and dtype {c.dtype}")

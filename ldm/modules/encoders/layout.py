"""LayoutEmbedder: bounding-box layouts -> token features for cross-attention (LDM layout-to-image).

Each object (class, x0, y0, x1, y1) becomes 3 tokens of one vocabulary:
  [0, bins²)                       corner tokens: the cell (y·bins + x) of a bins×bins grid,
  [bins², bins² + n_classes)       class tokens,
  bins² + n_classes                the pad token (all 3 tokens of an absent object).
The sequence (3·max_objects tokens) goes through `TransformerEncoder` with learned position embeddings.
Valid objects are moved to the front in their given order, so padding rows anywhere change nothing.

Ours beyond CompVis: with `raster_size` S the embedder also draws the boxes as an (n_classes, S, S) map (1 inside
each box, in its class's channel) and returns {"c_crossattn": tokens, "c_concat": map}, for
`conditioning_key: hybrid`: the U-Net reads where each box is from its input, as a segmentation-map model does,
and what it holds from both. Cross-attention alone must learn to route a box's tokens to the pixels inside it
through attention logits, and a small U-Net barely starts to within a CPU budget (ldm_shapes_layout_tiny.yaml).
"""
import torch
import torch.nn as nn

from ldm.modules.encoders.transformer_text import TransformerEncoder
from ldm.util import ConfigError


def corner_tokens(x: torch.Tensor, y: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Token of the grid cell holding (x, y) in [0, 1]²: floor(v·bins) per axis (1.0 in the last cell)."""
    xi = (x.clamp(0, 1) * n_bins).floor().long().clamp(max=n_bins - 1)
    yi = (y.clamp(0, 1) * n_bins).floor().long().clamp(max=n_bins - 1)
    return yi * n_bins + xi


def rasterize_boxes(objects: torch.Tensor, n_classes: int, size: int) -> torch.Tensor:
    """objects (B, n, 5) rows (class, x0, y0, x1, y1), class -1 = padding -> (B, n_classes, size, size) float map:
    1 where a pixel centre lies inside a box (edges included), in the channel of the box's class."""
    centres = (torch.arange(size, device=objects.device, dtype=objects.dtype) + 0.5) / size         # (S,)
    box = objects[..., 1:5, None]                                                                   # (B, n, 4, 1)
    inside_x = (centres >= box[:, :, 0]) & (centres <= box[:, :, 2])                                # (B, n, S)
    inside_y = (centres >= box[:, :, 1]) & (centres <= box[:, :, 3])                                # (B, n, S)
    inside = (inside_y[..., :, None] & inside_x[..., None, :]).to(objects.dtype)                   # (B, n, S, S)
    classes = objects[..., 0].round().long()
    one_hot = nn.functional.one_hot(classes.clamp(min=0), n_classes).to(objects.dtype)              # (B, n, C)
    one_hot = one_hot * (classes >= 0)[..., None]                                                   # padding: none
    return (one_hot[..., None, None] * inside[:, :, None]).sum(dim=1).clamp(max=1)                 # (B, C, S, S)


class LayoutEmbedder(nn.Module):
    """objects (B, n, 5) with n <= max_objects, padding rows class -1 -> (B, 3·max_objects, n_embed);
    with raster_size, {"c_crossattn": those tokens, "c_concat": (B, n_classes, S, S) box map}."""

    def __init__(self,
                 n_embed: int,                 # feature width D
                 n_layer: int,                 # transformer blocks
                 n_classes: int,               # object classes 0..n_classes-1
                 n_coord_bins: int = 64,       # grid cells per axis for box corners
                 max_objects: int = 30,        # objects per layout (3 tokens each)
                 embedding_dropout: float = 0.0,
                 heads: int = 8,
                 dim_head: int = 64,
                 raster_size: int | None = None):  # also draw the boxes at this size (the latents') for concat
        super().__init__()
        if n_classes < 1 or n_coord_bins < 1 or max_objects < 1:
            raise ConfigError(f"LayoutEmbedder needs n_classes, n_coord_bins, max_objects >= 1, got "
                              f"{n_classes}, {n_coord_bins}, {max_objects}")
        if raster_size is not None and raster_size < 1:
            raise ConfigError(f"LayoutEmbedder: raster_size must be a positive latent side or null, got {raster_size}")
        self.raster_size = raster_size
        self.condition_keys = ("c_crossattn",) if raster_size is None else ("c_crossattn", "c_concat")
        self.n_classes = n_classes
        self.n_coord_bins = n_coord_bins
        self.max_objects = max_objects
        self.pad_token = n_coord_bins ** 2 + n_classes
        self.output_dim = n_embed
        self.transformer = TransformerEncoder(self.pad_token + 1, 3 * max_objects, n_embed, n_layer,
                                              heads=heads, dim_head=dim_head, emb_dropout=embedding_dropout)

    def _check(self, objects: torch.Tensor) -> None:
        if not isinstance(objects, torch.Tensor) or objects.ndim != 3 or objects.shape[-1] != 5:
            shape = tuple(objects.shape) if isinstance(objects, torch.Tensor) else type(objects).__name__
            raise ValueError(f"LayoutEmbedder expects `objects` (B, n, 5) rows (class, x0, y0, x1, y1), got {shape}")
        if objects.shape[1] > self.max_objects:
            raise ValueError(f"LayoutEmbedder: {objects.shape[1]} object rows exceed max_objects={self.max_objects}")
        classes = objects[..., 0]
        bad = (classes >= self.n_classes) | ((classes < 0) & (classes != -1))
        if bad.any():
            raise ValueError(f"LayoutEmbedder: object classes must be -1 (padding) or in [0, {self.n_classes}), "
                             f"got {sorted(set(classes[bad].tolist()))}")
        rows = objects[classes >= 0]                                          # (N, 5) real objects
        x0, y0, x1, y1 = rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 4]
        outside = ((rows[:, 1:] < 0) | (rows[:, 1:] > 1)).any(dim=1) | (x0 > x1) | (y0 > y1)
        if outside.any():
            first = [round(v, 4) for v in rows[outside][0].tolist()]
            raise ValueError(f"LayoutEmbedder: {int(outside.sum())} box(es) outside [0, 1] or with x0 > x1 / y0 > "
                             f"y1, e.g. (class, x0, y0, x1, y1) = {tuple(first)}; corners are fractions of the "
                             f"image width and height, 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1")

    def tokenize(self, objects: torch.Tensor) -> torch.Tensor:
        """Token ids (B, 3·max_objects): per object [class, top-left, bottom-right]; pads at the end."""
        self._check(objects)
        b, n, _ = objects.shape
        valid = objects[..., 0] >= 0                                          # (B, n)
        order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
        objects = objects.gather(1, order[..., None].expand(-1, -1, 5))        # (B, n, 5) valid first
        valid = valid.gather(1, order)                                         # (B, n)
        tokens = torch.stack([self.n_coord_bins ** 2 + objects[..., 0].round().long().clamp(min=0),
                              corner_tokens(objects[..., 1], objects[..., 2], self.n_coord_bins),
                              corner_tokens(objects[..., 3], objects[..., 4], self.n_coord_bins)], dim=-1)
        tokens = tokens.masked_fill(~valid[..., None], self.pad_token)         # (B, n, 3)
        padded = tokens.new_full((b, self.max_objects, 3), self.pad_token)
        padded[:, :n] = tokens
        return padded.flatten(1)                                               # (B, 3·max_objects)

    def forward(self, objects: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        device = self.transformer.token_emb.weight.device
        features = self.transformer(self.tokenize(objects).to(device))        # (B, 3·max_objects, D)
        if self.raster_size is None:
            return features
        boxes = rasterize_boxes(objects.to(device, torch.float32), self.n_classes, self.raster_size)
        return {"c_crossattn": features, "c_concat": boxes}                    # boxes (B, n_classes, S, S)

    def encode(self, objects: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        return self(objects)

    def null_condition(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The empty layout: max_objects padding rows (class -1)."""
        objects = torch.zeros(batch_size, self.max_objects, 5, device=device)
        objects[..., 0] = -1
        return objects

    def unconditional(self, batch_size: int) -> torch.Tensor:
        return self.null_condition(batch_size)

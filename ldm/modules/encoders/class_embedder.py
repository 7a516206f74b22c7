"""ClassEmbedder: class labels -> one learned token (B, 1, embed_dim) (`cond_stage_model.embedding.weight`)."""
from typing import Mapping

import torch
import torch.nn as nn

from ldm.util import ConfigError


class ClassEmbedder(nn.Module):
    """Class label -> learned vector, shaped (B, 1, D) for cross-attention (squeeze it for `adm`).

    With add_null_class the table has n_classes + 1 rows and index n_classes means "no class"
    (classifier-free guidance). CompVis checkpoints have exactly n_classes rows: keep it False to load them.
    """

    def __init__(self,
                 embed_dim: int,                 # D
                 n_classes: int = 1000,          # real classes 0..n_classes-1
                 key: str = "class_label",       # batch key read when forward gets the batch dict
                 add_null_class: bool = False):  # extra row n_classes = the null class
        super().__init__()
        if n_classes < 1:
            raise ConfigError(f"ClassEmbedder.n_classes must be >= 1, got {n_classes}")
        self.key = key
        self.n_classes = n_classes
        self.add_null_class = add_null_class
        self.embedding = nn.Embedding(n_classes + int(add_null_class), embed_dim)
        self.output_dim = embed_dim

    def forward(self, c: torch.Tensor | Mapping) -> torch.Tensor:
        if isinstance(c, Mapping):
            if self.key not in c:
                raise KeyError(f"ClassEmbedder: batch has no key {self.key!r} (keys: {sorted(c)}); set `key`")
            c = c[self.key]
        c = torch.as_tensor(c, device=self.embedding.weight.device)
        if c.ndim != 1 or c.dtype.is_floating_point or c.dtype == torch.bool:
            raise ValueError(f"ClassEmbedder expects integer labels (B,), got {tuple(c.shape)} {c.dtype}")
        rows = self.embedding.num_embeddings
        if c.numel() and (c.min() < 0 or c.max() >= rows):
            raise ValueError(f"ClassEmbedder: labels must lie in [0, {rows}) "
                             f"({self.n_classes} classes{' + null' if self.add_null_class else ''}), "
                             f"got [{int(c.min())}, {int(c.max())}]")
        return self.embedding(c.long())[:, None, :]                          # (B, 1, D)

    def encode(self, c: torch.Tensor | Mapping) -> torch.Tensor:
        return self(c)

    def null_condition(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The null class index n_classes, B times (needs add_null_class=True)."""
        if not self.add_null_class:
            raise ConfigError("ClassEmbedder has no null class: set add_null_class: true "
                              "for classifier-free guidance (conditioning dropout / unconditional sampling)")
        return torch.full((batch_size,), self.n_classes, dtype=torch.long, device=device)

    def unconditional(self, batch_size: int) -> torch.Tensor:
        return self.null_condition(batch_size)

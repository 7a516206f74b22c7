"""A memo of a frozen first stage's encoder output per image, for training budgets where encoding costs.

On a CPU the frozen encoder is a fair share of a small latent-diffusion step (ldm_shapes_class_tiny at batch
16: 295 ms per step, 227 ms with every image cached; bench/first_stage_cache.py), and every epoch encodes
the same images again. The cache keeps, per image, what `encode` returned (a KL posterior's mean and
log-variance, or VQ pre-quantisation latents) under a digest of the image's bytes, so a repeated image
costs a hash instead of an encoder pass, and a KL posterior is still sampled afresh on every use. Keys are
contents, not dataset indices: an augmented (cropped, flipped) image is simply a new entry, never a stale
one. Least recently used entries go first beyond `size`; loading weights into the first stage must clear
it (LatentDiffusion does).
"""
import hashlib
from collections import OrderedDict
from typing import Callable

import torch

from ldm.modules.distributions import DiagonalGaussianDistribution

Encoded = DiagonalGaussianDistribution | torch.Tensor


def image_digest(x: torch.Tensor) -> bytes:
    """Digest of one image tensor's dtype, shape and bytes."""
    row = x.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{row.dtype}{tuple(row.shape)}".encode())
    h.update(row.numpy().tobytes() if row.dtype != torch.bfloat16 else row.view(torch.int16).numpy().tobytes())
    return h.digest()


class FirstStageCache:
    """LRU map image digest -> encoder output row (the Gaussian's parameters, or the latent tensor)."""

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"FirstStageCache: size must be >= 0, got {size}")
        self.size = size
        self._rows: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._gaussian: bool | None = None
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        self._rows.clear()
        self._gaussian = None

    def encode(self, x: torch.Tensor, encode: Callable[[torch.Tensor], Encoded]) -> Encoded:
        """encode(x) for a batch x (B, ...), calling `encode` only on the images not in the cache."""
        keys = [image_digest(row) for row in x]
        first = {}                                                               # new key -> its first batch index
        for i, key in enumerate(keys):
            if key not in self._rows and key not in first:
                first[key] = i
        if first:
            out = encode(x[list(first.values())])
            self._gaussian = isinstance(out, DiagonalGaussianDistribution)
            params = out.parameters if self._gaussian else out                   # (m, ...)
            for key, row in zip(first, params):
                self._rows[key] = row.detach()
        self.hits += len(keys) - len(first)
        self.misses += len(first)
        for key in dict.fromkeys(keys):
            self._rows.move_to_end(key)
        batch = torch.stack([self._rows[key] for key in keys])                   # (B, ...)
        while len(self._rows) > self.size:
            self._rows.popitem(last=False)
        return DiagonalGaussianDistribution(batch) if self._gaussian else batch

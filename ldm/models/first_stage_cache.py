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
from typing import Callable

import torch

from ldm.memo import LRUMemo
from ldm.modules.distributions import DiagonalGaussianDistribution

Encoded = DiagonalGaussianDistribution | torch.Tensor


def image_digest(x: torch.Tensor) -> bytes:
    """Digest of one image tensor's dtype, shape and bytes."""
    row = x.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{row.dtype}{tuple(row.shape)}".encode())
    h.update(row.numpy().tobytes() if row.dtype != torch.bfloat16 else row.view(torch.int16).numpy().tobytes())
    return h.digest()


class FirstStageCache(LRUMemo):
    """LRU map image digest -> encoder output row (the Gaussian's parameters, or the latent tensor)."""

    def __init__(self, size: int):
        super().__init__(size)
        self._gaussian: bool | None = None

    def clear(self) -> None:
        super().clear()
        self._gaussian = None

    def encode(self, x: torch.Tensor, encode: Callable[[torch.Tensor], Encoded]) -> Encoded:
        """encode(x) for a batch x (B, ...), calling `encode` only on the images not in the cache."""
        def compute(indices: list[int]) -> torch.Tensor:
            out = encode(x[indices])
            self._gaussian = isinstance(out, DiagonalGaussianDistribution)
            return out.parameters if self._gaussian else out                 # (m, ...)

        batch = torch.stack(self.rows([image_digest(row) for row in x], compute))   # (B, ...)
        return DiagonalGaussianDistribution(batch) if self._gaussian else batch

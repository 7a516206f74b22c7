"""Vector quantiser (VQ-VAE codebook) with straight-through gradients and dead-code restart."""
import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class VectorQuantizer(nn.Module):
    """Replace each latent vector by its nearest codebook entry (`embedding`, n_e x e_dim).

    loss (legacy=True, CompVis' default and what published VQ checkpoints were trained with):
        ||z - sg[e]||^2 + beta * ||sg[z] - e||^2      (beta on the codebook term)
    loss (legacy=False, the VQ-VAE paper):
        ||sg[z] - e||^2 + beta * ||z - sg[e]||^2      (beta on the commitment term)
    Gradients reach the encoder through the straight-through estimator z_q = z + sg[z_q - z].

    Codebook collapse remedy (training mode only): a code unused for `restart_unused_after`
    consecutive training forwards is re-initialised to a random encoder output of the current batch.
    Usage is summed over DDP ranks and the replacement vectors are broadcast from rank 0, so every
    rank keeps the same codebook. `steps_unused` is a buffer (saved for resume); state dicts without
    it (published CompVis checkpoints) still load. restart_unused_after=None disables the restart.

    remap (CompVis index remapping from a .npy file) is not supported; sane_index_shape returns
    indices as (B, H, W) instead of flat (B*H*W,).
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, remap: str | None = None,
                 sane_index_shape: bool = False, legacy: bool = True, restart_unused_after: int | None = 200):
        super().__init__()
        if remap is not None:
            raise NotImplementedError(f"VectorQuantizer: remap={remap!r} (index remapping from a .npy file) is not "
                                      f"supported; remove `remap` from the model config")
        if restart_unused_after is not None and restart_unused_after < 1:
            raise ValueError(f"VectorQuantizer: restart_unused_after must be >= 1 or None, got {restart_unused_after}")
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.sane_index_shape, self.legacy = sane_index_shape, legacy
        self.restart_unused_after = restart_unused_after
        self.embedding = nn.Embedding(n_e, e_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_e, 1.0 / n_e)
        self.register_buffer("steps_unused", torch.zeros(n_e, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "steps_unused", self.steps_unused.clone())  # CompVis files lack it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean, computed in float32) for each row of (N, e_dim)."""
        with _autocast_off(z_flat.device.type):
            z32, e32 = z_flat.float(), self.embedding.weight.float()
            dist2 = (z32 ** 2).sum(1, keepdim=True) + (e32 ** 2).sum(1) - 2.0 * z32 @ e32.t()  # (N, n_e)
        return dist2.argmin(dim=1)                                 # (N,)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """z (B, e_dim, H, W) -> (z_q (B, e_dim, H, W), loss, info {indices, perplexity, usage})."""
        b, c, h, w = z.shape
        if c != self.e_dim:
            raise ValueError(f"VectorQuantizer: input has {c} channels but the codebook has e_dim={self.e_dim}")
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, c)              # (B*H*W, C)
        indices = self.nearest(z_flat)                             # (B*H*W,)
        z_q = self.embedding(indices).to(z.dtype)                  # (B*H*W, C)
        z_q = z_q.view(b, h, w, c).permute(0, 3, 1, 2)            # (B, C, H, W)
        commitment = F.mse_loss(z, z_q.detach())
        codebook = F.mse_loss(z_q, z.detach())
        loss = commitment + self.beta * codebook if self.legacy else codebook + self.beta * commitment
        z_q = z + (z_q - z).detach()                               # straight-through estimator
        counts = torch.bincount(indices, minlength=self.n_e)       # (n_e,)
        info = {"indices": indices.view(b, h, w) if self.sane_index_shape else indices,
                "perplexity": perplexity(counts), "usage": (counts > 0).float().mean()}
        if self.training and self.restart_unused_after is not None:
            self._restart_dead_codes(z_flat.detach(), counts)
        return z_q, loss, info

    @torch.no_grad()
    def _restart_dead_codes(self, z_flat: torch.Tensor, counts: torch.Tensor) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            counts = counts.clone()
            dist.all_reduce(counts)                                # same usage, hence same dead set, on all ranks
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        dead = torch.nonzero(self.steps_unused >= self.restart_unused_after).squeeze(1)  # (K,)
        if dead.numel() == 0:
            return
        n = z_flat.shape[0]
        pick = torch.randperm(n, device=z_flat.device)[:dead.numel()] if n >= dead.numel() \
            else torch.randint(0, n, (dead.numel(),), device=z_flat.device)
        fresh = z_flat[pick].to(self.embedding.weight.dtype)       # (K, e_dim)
        if distributed:
            dist.broadcast(fresh, src=0)
        self.embedding.weight[dead] = fresh
        self.steps_unused[dead] = 0

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, int, int, int] | None) -> torch.Tensor:
        """Codes for `indices`; with shape (B, H, W, C) returned as (B, C, H, W), else (N, e_dim)."""
        z_q = self.embedding(indices.reshape(-1))                  # (N, C)
        if shape is None:
            return z_q
        return z_q.view(shape).permute(0, 3, 1, 2).contiguous()   # (B, C, H, W)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code-usage histogram: 1 when one code is used, n_e when all are used equally."""
    p = counts.float() / counts.sum().clamp(min=1)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-10))).sum())


def _autocast_off(device_type: str):
    """Disable autocast on devices that have it (meta tensors, used to size models, have none)."""
    return torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") \
        else contextlib.nullcontext()

"""Attention layers of the U-Net: cross-attention transformer (SpatialTransformer) and plain AttentionBlock.

All attention goes through `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU).
Attribute names follow the CompVis checkpoint layout (REFERENCE.md §2).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.diffusionmodules.layers import NUM_GROUPS, checkpoint, normalization, zero_module


class CrossAttention(nn.Module):
    """Multi-head attention of x (B, N, query_dim) over context (B, L, context_dim); self-attention without context.

    Keys: `to_q`, `to_k`, `to_v` (no bias), `to_out.0` (bias). Scale 1/sqrt(dim_head).
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        if context.shape[-1] != self.to_k.in_features:
            raise ValueError(f"CrossAttention: context has {context.shape[-1]} features per token, "
                             f"expected context_dim={self.to_k.in_features}")
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, N, H*D), (B, L, H*D) x2
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, N|L, D)
        out = F.scaled_dot_product_attention(q, k, v)                    # (B, H, N, D)
        return self.to_out(out.transpose(1, 2).flatten(2))               # (B, N, query_dim)


class GEGLU(nn.Module):
    """proj (dim_in -> 2*dim_out) split as [x, gate]; returns x * GELU(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)                          # (B, N, dim_out) each
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP: `net.0.proj` (dim -> 2*mult*dim), dropout, `net.2` (mult*dim -> dim)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)                                               # (B, N, dim)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention (`attn1`), cross-attention (`attn2`) and GEGLU feed-forward (`ff`), each residual.

    `disable_self_attn` makes attn1 attend to the context too (SD 2.x). Without a context attn2 self-attends.
    """

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None,
                 disable_self_attn: bool = False, use_checkpoint: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.use_checkpoint = use_checkpoint
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return checkpoint(self._forward, x, context, enabled=self.use_checkpoint and self.training)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context if self.disable_self_attn else None)  # (B, N, dim)
        x = x + self.attn2(self.norm2(x), context)                                     # (B, N, dim)
        return x + self.ff(self.norm3(x))                                              # (B, N, dim)


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, cross-attending to a context (LDM / SD).

    Keys: `norm` (GroupNorm 32, eps 1e-6), `proj_in`, `transformer_blocks.K`, `proj_out` (zero-init);
    the projections are 1x1 convs (SD 1.x) or Linear layers with `use_linear` (SD 2.x).
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | None = None, disable_self_attn: bool = False, use_linear: bool = False,
                 use_checkpoint: bool = False, norm_num_groups: int = NUM_GROUPS):
        super().__init__()
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = normalization(in_channels, eps=1e-6, num_groups=norm_num_groups)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim, disable_self_attn, use_checkpoint)
            for _ in range(depth))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), context (B, L, context_dim) or None -> (B, C, H, W)."""
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)                                                 # (B, C, H, W)
        if not self.use_linear:
            x = self.proj_in(x)                                          # (B, inner, H, W)
        x = x.flatten(2).transpose(1, 2)                                 # (B, H*W, C | inner)
        if self.use_linear:
            x = self.proj_in(x)                                          # (B, H*W, inner)
        for block in self.transformer_blocks:
            x = block(x, context)                                        # (B, H*W, inner)
        if self.use_linear:
            x = self.proj_out(x)                                         # (B, H*W, C)
        x = x.transpose(1, 2).reshape(b, -1, h, w)                       # (B, C | inner, H, W)
        if not self.use_linear:
            x = self.proj_out(x)                                         # (B, C, H, W)
        return x + x_in


def qkv_attention(qkv: torch.Tensor, num_heads: int, new_order: bool) -> torch.Tensor:
    """Attention from a stacked qkv (B, 3*H*D, T) -> (B, H*D, T).

    Channel order of qkv: legacy (`new_order` False) splits heads first, channel h*3D + j*D + d for j in (q, k, v);
    the new order splits q, k, v first, channel j*H*D + h*D + d. Output channel is h*D + d in both.
    """
    b, width, t = qkv.shape
    d = width // (3 * num_heads)
    if new_order:
        qkv = qkv.reshape(b, 3, num_heads, d, t).permute(1, 0, 2, 4, 3)  # (3, B, H, T, D)
    else:
        qkv = qkv.reshape(b, num_heads, 3, d, t).permute(2, 0, 1, 4, 3)  # (3, B, H, T, D)
    q, k, v = qkv.unbind(0)                                              # (B, H, T, D) each
    out = F.scaled_dot_product_attention(q, k, v)                        # (B, H, T, D)
    return out.transpose(-1, -2).reshape(b, num_heads * d, t)            # (B, H*D, T)


class AttentionBlock(nn.Module):
    """Self-attention over the positions of a feature map without conditioning (LDM unconditional/class models).

    Keys: `norm`, `qkv` (1x1 Conv1d, C -> 3C), `proj_out` (1x1 Conv1d, zero-init). Heads: C // num_head_channels
    when num_head_channels is set, else num_heads. `use_new_attention_order` picks the qkv channel order.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False, use_checkpoint: bool = False,
                 norm_num_groups: int = NUM_GROUPS):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f"AttentionBlock: {channels} channels are not divisible by "
                                 f"num_head_channels={num_head_channels}")
            num_heads = channels // num_head_channels
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"AttentionBlock: {channels} channels cannot be split into num_heads={num_heads}")
        self.num_heads = num_heads
        self.new_order = use_new_attention_order
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels, num_groups=norm_num_groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, kernel_size=1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, x, enabled=self.use_checkpoint and self.training)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w)                                       # (B, C, T)
        qkv = self.qkv(self.norm(x))                                     # (B, 3C, T)
        out = self.proj_out(qkv_attention(qkv, self.num_heads, self.new_order))  # (B, C, T)
        return (x + out).reshape(b, c, h, w)

"""A small trainable transformer encoder (CompVis x-transformer key layout) and TransformerTextEmbedder.

Key layout of `TransformerEncoder`, as in CompVis' BERTEmbedder checkpoints (`cond_stage_model.transformer.*`):
`token_emb`, `pos_emb.emb`, `attn_layers.layers.{2i}.{0 norm, 1 to_q/to_k/to_v/to_out}` (self-attention),
`attn_layers.layers.{2i+1}.{0 norm, 1 net.0.0, 1 net.2}` (feed-forward), `norm`. CompVis files also carry an
unused language-model head `to_logits`; it is dropped on load (and reported by ldm.loading).
"""
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ldm.modules.encoders.text import check_prompt_length, load_tokenizer
from ldm.util import ConfigError


class SelfAttention(nn.Module):
    """Multi-head self-attention through SDPA (q/k/v without bias, output projection with bias)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(f(x), "b l (h d) -> b h l d", h=self.heads)
                   for f in (self.to_q, self.to_k, self.to_v))                # each (B, h, L, d)
        out = F.scaled_dot_product_attention(q, k, v)                        # (B, h, L, d)
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))           # (B, L, D)


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear with 4x width (`net.0.0`, `net.2`; slot 1 holds no weights)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, inner), nn.GELU()),
                                 nn.Identity(),
                                 nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AttentionLayers(nn.Module):
    """`depth` pre-LN blocks, each a self-attention layer then a feed-forward layer, with residuals."""

    def __init__(self, dim: int, depth: int, heads: int = 8, dim_head: int = 64):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), SelfAttention(dim, heads, dim_head)]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), FeedForward(dim)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, layer in self.layers:
            x = x + layer(norm(x))                                           # (B, L, D)
        return x


class LearnedPositionalEmbedding(nn.Module):
    """One learned vector per position (`emb.weight`: (max_seq_len, D))."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, length: int) -> torch.Tensor:
        return self.emb.weight[:length]                                      # (L, D)


class TransformerEncoder(nn.Module):
    """Token ids (B, L) -> features (B, L, dim): token + position embeddings, pre-LN blocks, final LayerNorm."""

    # published keys this module drops on load (ldm.loading reports them with the reason)
    UNUSED_CHECKPOINT_KEYS = {r"to_logits\.(weight|bias)": "the token-prediction head (to_logits) of CompVis' "
                                                           "x-transformer; conditioning uses the features before it"}

    def __init__(self, num_tokens: int, max_seq_len: int, dim: int, depth: int,
                 heads: int = 8, dim_head: int = 64, emb_dropout: float = 0.0):
        super().__init__()
        self.num_tokens = num_tokens
        self.max_seq_len = max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = LearnedPositionalEmbedding(dim, max_seq_len)
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.attn_layers = AttentionLayers(dim, depth, heads, dim_head)
        self.norm = nn.LayerNorm(dim)
        self.register_load_state_dict_pre_hook(_drop_logits_head)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"TransformerEncoder expects integer token ids (B, L), got {tuple(tokens.shape)} "
                             f"{tokens.dtype}")
        length = tokens.shape[1]
        if length > self.max_seq_len:
            raise ValueError(f"TransformerEncoder: sequence length {length} exceeds max_seq_len={self.max_seq_len}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.num_tokens):
            raise ValueError(f"TransformerEncoder: token ids must lie in [0, {self.num_tokens}) (vocab_size), "
                             f"got [{int(tokens.min())}, {int(tokens.max())}]")
        x = self.token_emb(tokens) + self.pos_emb(length)                   # (B, L, D)
        x = self.attn_layers(self.emb_dropout(x))                           # (B, L, D)
        return self.norm(x)                                                  # (B, L, D)


def _drop_logits_head(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """CompVis checkpoints hold an unused `to_logits` head; it has no counterpart here."""
    for key in [k for k in state_dict if k.startswith(prefix + "to_logits.")]:
        del state_dict[key]


class TransformerTextEmbedder(nn.Module):
    """Captions -> (B, max_seq_len, n_embed) with a transformer trained from scratch (LDM's BERTEmbedder).

    Tokenises with an HF tokenizer (default: the packaged MiniLM/BERT-uncased WordPiece, 30522 ids) and
    pads to max_seq_len; pad tokens are attended to, as in CompVis. With use_tokenizer=False the input
    is already token ids (B, L).
    """

    def __init__(self,
                 n_embed: int,                     # feature width D
                 n_layer: int,                     # transformer blocks
                 vocab_size: int = 30522,          # token embedding rows
                 max_seq_len: int = 77,            # tokens per caption
                 use_tokenizer: bool = True,       # False: forward takes token ids
                 tokenizer: str | None = None,     # HF tokenizer folder / hub id (None: packaged MiniLM)
                 embedding_dropout: float = 0.0,
                 heads: int = 8,
                 dim_head: int = 64):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.tokenizer = load_tokenizer(tokenizer, "TransformerTextEmbedder") if use_tokenizer else None
        if self.tokenizer is not None and len(self.tokenizer) > vocab_size:
            raise ConfigError(f"TransformerTextEmbedder.vocab_size={vocab_size} is smaller than the tokenizer's "
                              f"vocabulary ({len(self.tokenizer)})")
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer is not None else 0
        self.output_dim = n_embed
        self.transformer = TransformerEncoder(vocab_size, max_seq_len, n_embed, n_layer,
                                              heads=heads, dim_head=dim_head, emb_dropout=embedding_dropout)

    def check_length(self, text: Sequence[str] | str) -> None:
        """ValueError naming a prompt longer than max_seq_len tokens (sampling: nothing is cut silently)."""
        if self.tokenizer is not None:
            check_prompt_length(self.tokenizer, [text] if isinstance(text, str) else list(text), self.max_seq_len,
                                "TransformerTextEmbedder")

    def tokenize(self, text: Sequence[str]) -> torch.Tensor:
        """Token ids (B, max_seq_len); longer captions are cut (training data, as CompVis)."""
        if isinstance(text, str):
            text = [text]
        if not all(isinstance(t, str) for t in text):
            raise TypeError("TransformerTextEmbedder expects a list of captions (str); "
                            "set use_tokenizer=False to pass token ids")
        return self.tokenizer(list(text), padding="max_length", truncation=True,
                              max_length=self.max_seq_len, return_tensors="pt")["input_ids"]

    def forward(self, text: Sequence[str] | torch.Tensor) -> torch.Tensor:
        tokens = self.tokenize(text) if self.tokenizer is not None else text  # (B, L)
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"TransformerTextEmbedder(use_tokenizer=False) expects token ids (B, L), "
                            f"got {type(tokens).__name__}")
        return self.transformer(tokens.to(self.transformer.token_emb.weight.device))  # (B, L, D)

    def encode(self, text: Sequence[str] | torch.Tensor) -> torch.Tensor:
        return self(text)

    def null_condition(self, batch_size: int, device: torch.device | str | None = None):
        """The empty caption, or an all-pad id sequence when use_tokenizer=False."""
        if self.tokenizer is not None:
            return [""] * batch_size
        return torch.full((batch_size, self.max_seq_len), self.pad_token_id, dtype=torch.long, device=device)

    def unconditional(self, batch_size: int):
        return self.null_condition(batch_size)

"""FrozenOpenCLIPEmbedder: the OpenCLIP text tower of Stable Diffusion 2.x (ViT-H-14), written here, key for key.

Keys under `cond_stage_model.model.` are those of OpenCLIP's CLIP text tower as SD 2.x checkpoints store them:
`token_embedding.weight`, `positional_embedding`, `transformer.resblocks.N.{ln_1, attn.in_proj_weight,
attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`, `text_projection`, `logit_scale`
(294 keys for ViT-H-14; no vision tower). Features: tokens -> embeddings -> the first `layers - layer_idx`
residual blocks (causal attention) -> ln_final, (B, 77, width): "penultimate" (SD 2.x, StableSR) skips the last
block, as SD 2.x does.

No download: weights come from a full SD 2.x / StableSR checkpoint (`pretrained: false`, what `ldm.load_model` and
a model-level `ckpt_path` use), from an OpenCLIP weights file (`version: /path/open_clip_pytorch_model.bin`) or
from the local Hugging Face cache. Tokens: the empty prompt (StableSR's only prompt) needs no vocabulary; other
prompts use `open_clip.tokenize` (package open-clip-torch) or a local transformers CLIPTokenizer folder (`tokenizer`).
"""
import math
import os
from collections import OrderedDict
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from ldm.checkpoint import read_state_dict
from ldm.memo import LRUMemo
from ldm.util import ConfigError

SOT, EOT = 49406, 49407          # CLIP BPE start / end of text; OpenCLIP pads with 0
ARCHS = {  # text towers (OpenCLIP model configs)
    "ViT-H-14": dict(width=1024, layers=24, heads=16, embed_dim=1024, context_length=77, vocab_size=49408),
    "ViT-bigG-14": dict(width=1280, layers=32, heads=20, embed_dim=1280, context_length=77, vocab_size=49408),
}
HUB_FILES = {("ViT-H-14", "laion2b_s32b_b79k"): "laion/CLIP-ViT-H-14-laion2B-s32b-b79k",
             ("ViT-bigG-14", "laion2b_s39b_b160k"): "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"}
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
LAYERS = {"last": 0, "penultimate": 1}


class ResidualAttentionBlock(nn.Module):
    """Pre-norm causal self-attention (`attn`: nn.MultiheadAttention, keys in_proj_* / out_proj) and GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden), gelu=nn.GELU(),
                                             c_proj=nn.Linear(hidden, width)))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)                                                          # (B, L, D)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]    # (B, L, D)
        return x + self.mlp(self.ln_2(x))                                         # (B, L, D)


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))


class OpenCLIPTextTower(nn.Module):
    """OpenCLIP's text transformer (the parts of `CLIP` SD 2.x keeps), random init."""

    def __init__(self, width: int, layers: int, heads: int, embed_dim: int, context_length: int = 77,
                 vocab_size: int = 49408):
        super().__init__()
        self.context_length, self.vocab_size = context_length, vocab_size
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.transformer = Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        mask = torch.full((context_length, context_length), float("-inf")).triu(1)   # causal
        self.register_buffer("attn_mask", mask, persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, skip_last: int = 0) -> torch.Tensor:
        """tokens (B, context_length) -> ln_final of the output of all blocks but the last `skip_last` (B, L, D)."""
        x = self.token_embedding(tokens) + self.positional_embedding              # (B, L, D)
        mask = self.attn_mask.to(x.dtype)
        blocks = self.transformer.resblocks
        for block in blocks[:len(blocks) - skip_last]:
            x = block(x, mask)                                                    # (B, L, D)
        return self.ln_final(x)                                                   # (B, L, D)


def _architecture(arch: str | Mapping) -> dict:
    if isinstance(arch, Mapping):
        return dict(ARCHS["ViT-H-14"], **arch)
    if arch not in ARCHS:
        raise ConfigError(f"FrozenOpenCLIPEmbedder: arch {arch!r} is not known; choose one of {sorted(ARCHS)} "
                          "(or give the text tower's sizes as a mapping: width, layers, heads, embed_dim)")
    return dict(ARCHS[arch])


def find_weights(arch: str | Mapping, version: str) -> str:
    """The OpenCLIP weights file: `version` itself when it is a file, else the local Hugging Face cache's copy."""
    if os.path.isfile(version):
        return version
    repo = HUB_FILES.get((arch, version)) if isinstance(arch, str) else None
    if repo is not None:
        from huggingface_hub import try_to_load_from_cache
        for name in WEIGHT_FILES:
            path = try_to_load_from_cache(repo, name)
            if isinstance(path, str) and os.path.isfile(path):
                return path
    where = (f"`hf download {repo} {WEIGHT_FILES[1]}` on a machine with internet (then copy the Hugging Face "
             f"cache), or put {WEIGHT_FILES[1]} anywhere and set cond_stage_config.params.version to its path"
             if repo else "set cond_stage_config.params.version to the path of an OpenCLIP weights file")
    raise FileNotFoundError(
        f"FrozenOpenCLIPEmbedder: no pretrained weights for {arch} / {version!r} here (no network). {where}. "
        "A full Stable Diffusion 2.x or StableSR checkpoint brings these weights itself: with "
        "model.params.ckpt_path or ldm.load_model none of this is needed; pretrained: false builds random weights.")


class FrozenOpenCLIPEmbedder(nn.Module):
    """Prompts -> OpenCLIP text features (B, 77, width); SD 2.x's conditioner (`cond_stage_model.model.*`).

    Params as SD 2.x's class (arch, version, max_length, freeze, layer; `device` is dropped by the alias) and ours:
    pretrained (load `version`'s weights at construction; false: random init), tokenizer (a transformers
    CLIPTokenizer folder / hub id, used when open_clip is not installed), cache_size (frozen: keep features of
    this many prompts).
    """

    params_when_restored = {"pretrained": False}   # a checkpoint that brings the weights: build without them

    def __init__(self, arch: str | Mapping = "ViT-H-14", version: str = "laion2b_s32b_b79k", max_length: int = 77,
                 freeze: bool = True, layer: str = "last", pretrained: bool = True, tokenizer: str | None = None,
                 cache_size: int = 0):
        super().__init__()
        if layer not in LAYERS:
            raise ConfigError(f"FrozenOpenCLIPEmbedder.layer must be one of {tuple(LAYERS)}, got {layer!r}")
        dims = _architecture(arch)
        if max_length != dims["context_length"]:
            raise ConfigError(f"FrozenOpenCLIPEmbedder.max_length={max_length}: OpenCLIP's text tower always reads "
                              f"{dims['context_length']} tokens")
        if cache_size < 0 or (cache_size and not freeze):
            raise ConfigError(f"FrozenOpenCLIPEmbedder.cache_size must be >= 0 and needs freeze=true, got "
                              f"cache_size={cache_size}, freeze={freeze}")
        path = find_weights(arch, version) if pretrained else None   # before building: fail fast, no memory
        self.model = OpenCLIPTextTower(**dims)
        if path is not None:
            sd = {k: v for k, v in read_state_dict(path).items() if not k.startswith("visual.")}
            sd.pop("attn_mask", None)
            try:
                self.model.load_state_dict(sd, strict=True)
            except RuntimeError as err:
                raise RuntimeError(f"FrozenOpenCLIPEmbedder: {path!r} does not fit the {arch} text tower: {err}") \
                    from err
        self.layer, self.skip_last, self.max_length = layer, LAYERS[layer], max_length
        self.tokenizer_name, self._tokenizer = tokenizer, None
        self.output_dim = dims["width"]
        self.frozen = freeze
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()
        self._cache = LRUMemo(cache_size)
        self.cache_size = cache_size
        self.register_load_state_dict_post_hook(lambda module, _: module._cache.clear())

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True) -> "FrozenOpenCLIPEmbedder":
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    # ---- tokens -----------------------------------------------------------------------------------------------
    def tokenize(self, text: Sequence[str]) -> torch.Tensor:
        """(B, 77) ids as open_clip.tokenize: [SOT, BPE..., EOT], 0-padded; longer prompts cut, ending in EOT."""
        text = _captions(text)
        if all(t == "" for t in text):
            rows = [[SOT, EOT] for _ in text]
        else:
            rows = self._bpe(text)
        out = torch.zeros(len(rows), self.max_length, dtype=torch.long)
        for i, ids in enumerate(rows):
            ids = list(ids)
            if len(ids) > self.max_length:
                ids = ids[:self.max_length - 1] + [EOT]
            out[i, :len(ids)] = torch.tensor(ids)
        return out

    def _bpe(self, text: list[str]) -> list[list[int]]:
        """[SOT, BPE ids, EOT] per prompt: open_clip's tokenizer, else the transformers CLIPTokenizer `tokenizer`."""
        if self.tokenizer_name is None:
            try:
                import open_clip
            except ImportError:
                raise ConfigError(
                    "FrozenOpenCLIPEmbedder: prompts other than '' need the CLIP BPE vocabulary: pip install "
                    "open-clip-torch, or set cond_stage_config.params.tokenizer to a local folder with a CLIP "
                    "tokenizer (vocab.json + merges.txt, e.g. of openai/clip-vit-large-patch14: the same BPE)") \
                    from None
            tokens = open_clip.tokenize(text, context_length=self.max_length)
            return [[int(i) for i in row if i != 0] for row in tokens]
        if self._tokenizer is None:
            from ldm.modules.encoders.text import load_tokenizer
            self._tokenizer = load_tokenizer(self.tokenizer_name, "FrozenOpenCLIPEmbedder")
        return [list(ids) for ids in self._tokenizer(text, add_special_tokens=True)["input_ids"]]

    # ---- features ---------------------------------------------------------------------------------------------
    def forward(self, text: Sequence[str]) -> torch.Tensor:
        text = _captions(text)
        if not self.cache_size:
            return self._encode(text)
        return torch.stack(self._cache.rows(text, lambda idx: self._encode([text[i] for i in idx])))  # (B, L, D)

    def _encode(self, text: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenize(text)                                               # (B, L)
        if int(tokens.max()) >= self.model.vocab_size:
            raise ValueError(f"FrozenOpenCLIPEmbedder: token id {int(tokens.max())} >= vocab_size "
                             f"{self.model.vocab_size}; the tokenizer does not fit the model")
        tokens = tokens.to(self.model.positional_embedding.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.model(tokens, self.skip_last)                              # (B, L, D)

    def encode(self, text: Sequence[str]) -> torch.Tensor:
        return self(text)

    def null_condition(self, batch_size: int, device: torch.device | str | None = None) -> list[str]:
        """The empty prompt, B times (StableSR's prompt; the unconditional branch of guidance)."""
        return [""] * batch_size

    def unconditional(self, batch_size: int) -> list[str]:
        return self.null_condition(batch_size)


def _captions(text: Sequence[str] | str) -> list[str]:
    if isinstance(text, str):
        return [text]
    if not all(isinstance(t, str) for t in text):
        raise TypeError(f"FrozenOpenCLIPEmbedder expects a list of prompts (str), got {type(text).__name__}")
    return list(text)

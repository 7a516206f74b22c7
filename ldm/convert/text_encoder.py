"""The SD 1.x text encoder: transformers' CLIPTextModel under `cond_stage_model.transformer.*` here, a
`text_encoder/` folder (config.json + model.safetensors) in a diffusers pipeline.

Both sides are written in the published naming (`text_model.*`, no stale `position_ids`), which transformers 4
and 5 both load; files in transformers 5's naming (no `text_model.` level) are read too. CLIP's number of heads
is not in the weights: the config comes from the model's `version` (local folder or Hugging Face cache), a
`--clip` folder, or, for weights shaped like openai/clip-vit-large-patch14, that model's published config.
"""
import os
from typing import Any, Mapping

import torch

from ldm.convert.keymap import ConversionError, StateDict, check_shapes, meta_state_dict, shapes

LEVEL = "text_model."
CLIP_L = "openai/clip-vit-large-patch14"
# the text config of openai/clip-vit-large-patch14 (SD 1.x), as published in its config.json
CLIP_L_CONFIG = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768,
                 "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def published_naming(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """CLIPTextModel keys with the `text_model.` level and without `position_ids`."""
    return {(k if k.startswith(LEVEL) else LEVEL + k): v for k, v in sd.items()
            if not k.endswith("embeddings.position_ids")}


def clip_config(version: str | None, sd: Mapping[str, torch.Tensor], folder: str | None = None,
                source: str = "text encoder") -> dict[str, Any]:
    """The CLIPTextConfig (as a dict) of these weights: from `folder`, else `version`, else CLIP-L's if it fits."""
    from transformers import CLIPTextConfig

    errors = []
    for candidate in (folder, version):
        if candidate:
            try:
                return CLIPTextConfig.from_pretrained(candidate).to_dict()
            except (OSError, ValueError) as err:
                errors.append(f"{candidate}: {err}")
    sd = published_naming(sd)
    token = sd.get(f"{LEVEL}embeddings.token_embedding.weight")
    layers = len({k.split(".")[3] for k in sd if k.startswith(f"{LEVEL}encoder.layers.")})
    if token is not None and tuple(token.shape) == (49408, 768) and layers == 12:
        return CLIPTextConfig(**CLIP_L_CONFIG).to_dict()
    raise ConversionError(f"{source}: the CLIP text config (number of heads, activation) is not in the weights and "
                          f"could not be read ({'; '.join(errors) or 'no version given'}); pass --clip FOLDER with "
                          f"the text model's config.json")


def check_text_encoder(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], source: str,
                       prefix: str = "") -> None:
    """Keys and shapes of CLIP weights (either naming) against a CLIPTextModel built from `config`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    expected = shapes(published_naming(meta_state_dict(lambda: CLIPTextModel(CLIPTextConfig(**config)))))
    check_shapes(expected, published_naming(sd), source, "CLIPTextModel", prefix)


def save_text_config(config: Mapping[str, Any], folder: str) -> None:
    from transformers import CLIPTextConfig

    config = dict(config)
    config.pop("transformers_version", None)
    CLIPTextConfig(**config).save_pretrained(folder)


def copy_tokenizer(name: str | None, folder: str) -> str | None:
    """Save the tokenizer `name` (local folder / HF cache) into `folder`; None on success, else the reason."""
    if not name:
        return "no tokenizer named by the config"
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(name).save_pretrained(folder)
    except (OSError, ValueError) as err:
        return f"tokenizer {name!r} is not available offline ({type(err).__name__})"
    return None


def tokenizer_folder(folder: str) -> str | None:
    return folder if os.path.isdir(folder) and os.listdir(folder) else None

"""Files of diffusers model folders: config.json and weights, read safely and written atomically.

Weights are read from `<name>.safetensors`, `<name>.bin` (weights-only unpickling), or a sharded
`<name>.safetensors.index.json`; written as one `<name>.safetensors`.
"""
import json
import os
from typing import Any, Mapping

import torch

from ldm.checkpoint import read_state_dict, save_safetensors, save_text_atomic
from ldm.convert.keymap import ConversionError, StateDict

DIFFUSERS_VERSION = "0.42.1"   # the diffusers release these folders were checked against (tests)
DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS = "diffusion_pytorch_model", "model"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: file does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from err


def write_json(obj: Mapping[str, Any], path: str) -> None:
    save_text_atomic(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def weights_file(folder: str, name: str) -> str:
    """The weights file of a component folder (safetensors preferred)."""
    for candidate in (f"{name}.safetensors", f"{name}.safetensors.index.json", f"{name}.bin"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    raise ConversionError(f"{folder}: no weights file ({name}.safetensors, {name}.safetensors.index.json or "
                          f"{name}.bin)")


def read_weights(folder: str, name: str, allow_pickle: bool = False) -> tuple[StateDict, str]:
    """(state dict, file path) of a component folder."""
    path = weights_file(folder, name)
    if not path.endswith(".index.json"):
        return read_state_dict(path, allow_pickle=allow_pickle), path
    shards = sorted(set(read_json(path).get("weight_map", {}).values()))
    sd: StateDict = {}
    for shard in shards:
        sd.update(read_state_dict(os.path.join(folder, shard), allow_pickle=allow_pickle))
    return sd, path


def cast(sd: Mapping[str, torch.Tensor], dtype: str | None) -> StateDict:
    """Floating-point tensors in `dtype` (fp32 / fp16 / bf16); None keeps them as they are."""
    if dtype is None:
        return dict(sd)
    target = DTYPES[dtype]
    return {k: v.to(target) if v.is_floating_point() else v for k, v in sd.items()}


def write_component(folder: str, config: Mapping[str, Any], sd: Mapping[str, torch.Tensor],
                    name: str = DIFFUSERS_WEIGHTS) -> None:
    """config.json (with `_diffusers_version`) and `<name>.safetensors` in `folder`."""
    os.makedirs(folder, exist_ok=True)
    if name == DIFFUSERS_WEIGHTS:
        config = {"_class_name": config["_class_name"], "_diffusers_version": DIFFUSERS_VERSION,
                  **{k: v for k, v in config.items() if k != "_class_name"}}
        write_json(config, os.path.join(folder, "config.json"))
    save_safetensors(sd, os.path.join(folder, f"{name}.safetensors"), metadata={"format": "pt"})


def read_component(folder: str, name: str = DIFFUSERS_WEIGHTS,
                   allow_pickle: bool = False) -> tuple[dict[str, Any], StateDict, str]:
    """(config.json, state dict, weights path) of a diffusers / transformers model folder."""
    if not os.path.isdir(folder):
        raise ConversionError(f"{folder}: folder does not exist")
    config = read_json(os.path.join(folder, "config.json"))
    sd, path = read_weights(folder, name, allow_pickle)
    return config, sd, path

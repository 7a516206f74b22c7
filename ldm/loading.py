"""load_model: an inference model from our config or an original CompVis/SD YAML, with a checkpoint loaded strictly.

Known harmless differences between published files and the model are handled by rule, each said in an info log:
- `model_ema.*`: use_ema=True puts the EMA copies in place of the weights they track (the U-Net of a diffusion
  model); use_ema=False drops them. A file without them (SD "ema-only" files) loads as stored.
- `loss.*` of first-stage training files: dropped where the model has no module of that name (no training loss).
- keys the model's own load hooks rename or drop (the CLIP `text_model.` level of older transformers, their stale
  `position_ids`, the unused `to_logits` head of BERTEmbedder files) are reported; a module's
  UNUSED_CHECKPOINT_KEYS gives the reason for the keys it drops.
- one module under two names (`__is_first_stage__`: cond_stage_model is the first stage): a file holding one copy
  fills the other.
Anything else that does not fit is a CheckpointMismatchError with the grouped report (strict, the default).
Only the `model` section is built; original data sets and callbacks in the other sections are noted in the log.
"""
import copy
import inspect
import logging
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.checkpoint import CheckpointMismatchError, KeyReport, compare_state_dict, read_state_dict
from ldm.compat import original_targets_outside_model
from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config

log = logging.getLogger(__name__)

EMA_PREFIX = "model_ema."
EMA_COUNTERS = ("decay", "num_updates")
IDENTITY = {"target": "torch.nn.Identity"}

ConfigSource = str | os.PathLike | Sequence[str | os.PathLike] | Mapping | DictConfig


def load_model(config: ConfigSource, ckpt: str | os.PathLike, *, use_ema: bool = True,
               device: str | torch.device | None = None, allow_pickle: bool = False, strict: bool = True,
               overrides: Iterable[str] = ()) -> nn.Module:
    """Build the model of `config` for inference and load `ckpt` (`.ckpt`, `.pt`, `.safetensors`) into it.

    config: a YAML path (ours or an original CompVis/SD file, unchanged), several paths (merged left to right),
    or a mapping; `overrides` are dotlist words applied last (e.g.
    `model.params.cond_stage_config.params.version=/models/clip-vit-large-patch14`).
    use_ema: use the file's EMA weights when it has them. allow_pickle: permit arbitrary unpickling (trusted
    files only). strict=False loads what fits and logs the report instead of raising. Returns the model in eval
    mode on `device` (default CPU).
    """
    state_dict = read_state_dict(ckpt, allow_pickle=allow_pickle)  # first: a missing or unsafe file fails fast
    model = build_model(config, overrides=overrides)
    load_weights(model, state_dict, use_ema=use_ema, strict=strict, source=os.fspath(ckpt))
    return model.to(device or "cpu").eval()


# ---- building ----------------------------------------------------------------------------------------------------
def model_section(config: ConfigSource, overrides: Iterable[str] = ()) -> DictConfig:
    """The `model` section ({target, params}) of YAML file(s) or a mapping (a bare {target, params} too)."""
    if isinstance(config, (str, os.PathLike)):
        config = [config]
    if isinstance(config, (list, tuple, ListConfig)):
        for path in config:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"config file {os.fspath(path)!r} does not exist")
        cfg = OmegaConf.merge(*[OmegaConf.load(path) for path in config])
    elif isinstance(config, (Mapping, DictConfig)):
        cfg = OmegaConf.create(copy.deepcopy(config) if isinstance(config, Mapping) else config)
    else:
        raise TypeError(f"load_model: config must be a YAML path, a list of paths or a mapping, "
                        f"got {type(config).__name__}")
    overrides = list(overrides)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    section = cfg.model if "model" in cfg else cfg
    if not isinstance(section, DictConfig) or "target" not in section:
        raise ConfigError(f"config has no model.target (top-level keys: {sorted(map(str, cfg.keys()))})")
    if section is not cfg:
        for note in original_targets_outside_model(cfg):  # data sets, callbacks of the original repositories
            log.info(note)
    return section


def inference_config(section: Mapping | DictConfig) -> tuple[dict, list[str]]:
    """The model section as built for loading a full checkpoint, and what was changed, in words:
    nested `ckpt_path`s are not read (the checkpoint brings those weights), every `lossconfig` becomes
    torch.nn.Identity (no training loss, no LPIPS download), the top model builds without its own EMA copy
    (use_ema is chosen at load) and, for latent diffusion, without first-stage weights of its own."""
    cfg = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else copy.deepcopy(section)
    notes: list[str] = []
    _strip_training_parts(cfg, "model", notes)
    params = cfg.get("params") or {}
    accepted = _accepted_params(cfg["target"])
    if "use_ema" in accepted and params.get("use_ema", True):
        params["use_ema"] = False
        notes.append("model.params.use_ema: no EMA copy is built; the file's EMA weights are chosen at load "
                     "(load_model(use_ema=...))")
    if "allow_random_first_stage" in accepted:
        params["allow_random_first_stage"] = True
    cfg["params"] = params
    return cfg, notes


def _strip_training_parts(node: Any, where: str, notes: list[str]) -> None:
    if isinstance(node, list):
        for i, item in enumerate(node):
            _strip_training_parts(item, f"{where}[{i}]", notes)
    if not isinstance(node, dict):
        return
    if "ckpt_path" in node:
        path = node.pop("ckpt_path")
        if path:
            notes.append(f"{where}.ckpt_path={path!r} is not read: the checkpoint brings these weights")
    if isinstance(node.get("lossconfig"), Mapping) and node["lossconfig"].get("target") != IDENTITY["target"]:
        notes.append(f"{where}.lossconfig ({node['lossconfig'].get('target')}) is not built: no training loss "
                     f"at inference")
        node["lossconfig"] = dict(IDENTITY)
    for key, value in node.items():
        _strip_training_parts(value, f"{where}.{key}", notes)


def _accepted_params(target: str) -> set[str]:
    return set(inspect.signature(get_obj_from_str(target)).parameters)


def build_model(config: ConfigSource, *, overrides: Iterable[str] = ()) -> nn.Module:
    """The model of `config` as load_model builds it (see inference_config), on the CPU."""
    cfg, notes = inference_config(model_section(config, overrides))
    for note in notes:
        log.info(note)
    return instantiate_from_config(cfg, where="model")


# ---- loading -----------------------------------------------------------------------------------------------------
def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, use_ema: bool = True,
                 strict: bool = True, source: str = "state dict") -> KeyReport:
    """Load `state_dict` into `model` after the rules of this module (each logged); returns the report (its notes:
    the rules applied). strict: any remaining mismatch raises CheckpointMismatchError (the model is then partly
    loaded: discard it); otherwise the report is a warning and the keys that fit are loaded. Parameters on the
    meta device work (a file of meta tensors checks keys and shapes without memory)."""
    model_tensors = model.state_dict(keep_vars=True)
    expected = {k: tuple(v.shape) for k, v in model_tensors.items()}
    notes: list[str] = []
    sd = select_ema(dict(state_dict), expected, use_ema, notes)
    sd = drop_unused_losses(sd, expected, notes)
    fill_shared(model_tensors, sd, notes)
    received = _load_capturing(model, sd)
    _note_hook_changes(model, set(sd), received, notes)
    report = compare_state_dict(expected, received)
    report.notes = notes
    for note in notes:
        log.info("%s: %s", source, note)
    if not report.ok:
        message = report.describe(source, type(model).__name__)
        if strict:
            raise CheckpointMismatchError(message, report)
        log.warning(message)
    return report


def _load_capturing(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """load_state_dict(strict=False) (every tensor of the right shape is copied), returning the keys as the modules
    received them: each module's load hooks may rename, drop or add keys (CLIP layouts, stale position_ids,
    defaults for buffers the file lacks); a capturing pre-hook, run after them, records each module's own keys."""
    received: dict[str, torch.Tensor] = {}

    def capture(module: nn.Module, state_dict: Mapping, prefix: str, *args: Any) -> None:
        children = {n for n, c in module._modules.items() if c is not None}  # as torch's loader walks them
        received.update({k: v for k, v in state_dict.items()
                         if k.startswith(prefix) and k[len(prefix):].split(".")[0] not in children})

    handles = [module.register_load_state_dict_pre_hook(capture) for module in model.modules()]
    try:
        model.load_state_dict(sd, strict=False)
    except RuntimeError as err:  # size mismatches: reported by compare_state_dict; anything else is re-raised
        if "size mismatch" not in str(err):
            raise
    finally:
        for handle in handles:
            handle.remove()
    return received


def _note_hook_changes(model: nn.Module, before: set[str], received: Mapping[str, torch.Tensor],
                       notes: list[str]) -> None:
    """Say which file keys the model's load hooks renamed or dropped; dropped keys a module declares unused
    (`UNUSED_CHECKPOINT_KEYS`: pattern of its own key -> reason) are reported with that reason."""
    gone, new = [k for k in before if k not in received], [k for k in received if k not in before]
    endings = {".".join(k.split(".")[-2:]) for k in new}  # a renamed key keeps its module and tensor name
    dropped = sorted(k for k in gone if ".".join(k.split(".")[-2:]) not in endings)
    renamed = sorted(k for k in gone if k not in dropped)
    if renamed:
        notes.append(f"{len(renamed)} key(s) renamed to the model's layout by its load hooks (e.g. {renamed[0]})")
    by_rule = _declared_unused(model, dropped)
    for (where, reason), keys in by_rule.items():
        notes.append(f"{len(keys)} key(s) of the file not used, by rule of {where}: {reason} "
                     f"({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
    dropped = [k for k in dropped if not any(k in keys for keys in by_rule.values())]
    if dropped:
        notes.append(f"{len(dropped)} key(s) dropped by the model's load hooks (stale buffers / unused heads): "
                     f"{', '.join(dropped[:5])}")


def _declared_unused(model: nn.Module, keys: Iterable[str]) -> dict[tuple[str, str], list[str]]:
    """(module description, reason) -> the keys among `keys` that a module's UNUSED_CHECKPOINT_KEYS names."""
    rules = [(f"{name}." if name else "", type(module).__name__, pattern, reason)
             for name, module in model.named_modules()
             for pattern, reason in getattr(module, "UNUSED_CHECKPOINT_KEYS", {}).items()]
    found: dict[tuple[str, str], list[str]] = {}
    for key in keys:
        for prefix, cls, pattern, reason in rules:
            if key.startswith(prefix) and re.fullmatch(pattern, key[len(prefix):]):
                found.setdefault((f"{cls} ({prefix or 'root'}*)", reason), []).append(key)
                break
    return found


def select_ema(sd: dict, expected: Mapping[str, tuple], use_ema: bool, notes: list[str]) -> dict:
    """Resolve `model_ema.*` (CompVis LitEma: `decay`, `num_updates`, each tracked key with its dots removed)."""
    ema = {k[len(EMA_PREFIX):]: k for k in sd if k.startswith(EMA_PREFIX)}
    if any(k.startswith(EMA_PREFIX) for k in expected):
        return sd  # the model keeps its own EMA copy: matched like any other key
    if not ema:
        if use_ema:
            notes.append("no model_ema.* in the file: its weights are used as stored (EMA-only files already hold "
                         "the EMA weights)")
        return sd
    rest = {k: v for k, v in sd.items() if not k.startswith(EMA_PREFIX)}
    if not use_ema:
        notes.append(f"use_ema=False: {len(ema)} model_ema.* keys dropped; the training weights are used")
        return rest
    shadows = {name: key for name, key in ema.items() if name not in EMA_COUNTERS}
    root, targets = _ema_targets(expected, shadows)
    for name, key in targets.items():
        rest[key] = sd[shadows[name]]
    rest.update({shadows[n]: sd[shadows[n]] for n in shadows if n not in targets})  # reported as unexpected
    updates = int(sd[ema["num_updates"]]) if "num_updates" in ema else "?"
    notes.append(f"use_ema=True: {len(targets)} weights under {root or '(root)'}* replaced by their EMA copies "
                 f"(model_ema.*, {updates} updates)")
    untracked = [k for k in expected if k.startswith(root) and k not in targets.values()]
    if untracked:
        notes.append(f"{len(untracked)} key(s) under {root or '(root)'}* have no EMA copy and are used as stored "
                     f"(e.g. {untracked[0]})")
    return rest


def _ema_targets(expected: Mapping[str, tuple], shadows: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """The module prefix the EMA tracked (`model.` for a diffusion model, `` for an autoencoder) and, per EMA
    name, the model key it belongs to: the prefix under which the most EMA names match dot-free key names."""
    roots = {""} | {k.split(".")[0] + "." for k in expected if "." in k}
    best: tuple[str, dict[str, str]] = ("", {})
    for root in sorted(roots):
        index = {k[len(root):].replace(".", ""): k for k in expected if k.startswith(root)}
        targets = {name: index[name] for name in shadows if name in index}
        if len(targets) > len(best[1]):
            best = (root, targets)
    return best


def drop_unused_losses(sd: dict, expected: Mapping[str, tuple], notes: list[str]) -> dict:
    """Drop `loss.*` / `<prefix>.loss.*` keys (first-stage training loss: LPIPS, discriminator, logvar) where the
    model has no such module."""
    prefixes: dict[str, int] = {}
    for key in sd:
        parts = key.split(".")
        if "loss" in parts[:-1]:
            prefix = ".".join(parts[:parts.index("loss") + 1]) + "."
            if not any(k.startswith(prefix) for k in expected):
                prefixes[prefix] = prefixes.get(prefix, 0) + 1
    for prefix, count in prefixes.items():
        notes.append(f"{count} {prefix}* key(s) dropped: a training loss (LPIPS, discriminator, logvar) the model "
                     f"does not have")
    return {k: v for k, v in sd.items() if not k.startswith(tuple(prefixes))}


def fill_shared(model_tensors: Mapping[str, torch.Tensor], sd: dict, notes: list[str]) -> None:
    """Keys naming one tensor of the model twice (a module registered under two names) take the file's copy
    when the file has only one of them."""
    names: dict[int, list[str]] = {}
    for key, tensor in model_tensors.items():
        names.setdefault(id(tensor), []).append(key)
    filled: dict[tuple[str, str], int] = {}
    for keys in names.values():
        present = [k for k in keys if k in sd]
        for key in keys:
            if present and key not in sd:
                sd[key] = sd[present[0]]
                pair = (key.split(".")[0], present[0].split(".")[0])
                filled[pair] = filled.get(pair, 0) + 1
    for (to, src), count in filled.items():
        notes.append(f"{count} {to}.* key(s) taken from the file's {src}.*: the model holds one module under both "
                     f"names (e.g. __is_first_stage__)")

"""Config instantiation (`target`/`params`) and small helpers shared by every stage."""
import difflib
import importlib
import inspect
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration names something that does not exist or is malformed."""


def get_obj_from_str(path: str, reload: bool = False) -> Any:
    """Import `package.module.Name` and return `Name`; a clear ConfigError when it does not exist."""
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(f"target {path!r} is not a dotted import path like 'ldm.models.autoencoder.AutoencoderKL'")
    from ldm.compat import resolve_target  # CompVis/SD targets -> ours (imported here: compat imports this module)
    if (aliased := resolve_target(path)) is not None:
        return aliased
    module_name, name = path.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"target {path!r}: cannot import module {module_name!r} ({err})") from err
    if reload:
        module = importlib.reload(module)
    if not hasattr(module, name):
        public = [n for n in dir(module) if not n.startswith("_")]
        hint = difflib.get_close_matches(name, public, n=3)
        raise ConfigError(f"target {path!r}: module {module_name!r} has no {name!r}"
                          + (f"; did you mean {', '.join(hint)}?" if hint else ""))
    return getattr(module, name)


def _accepted_kwargs(obj: Any) -> tuple[set[str], bool]:
    """Names `obj(**kw)` accepts and whether it also takes **kwargs."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in sig.parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    return names, var_kw


def check_params(obj: Any, params: Mapping, where: str) -> None:
    """Raise a ConfigError naming each key of `params` that `obj` does not accept (with a suggestion)."""
    names, var_kw = _accepted_kwargs(obj)
    if var_kw:
        return
    unknown = [k for k in params if k not in names]
    if unknown:
        lines = []
        for k in unknown:
            hint = difflib.get_close_matches(k, sorted(names), n=1)
            lines.append(f"{where}.params.{k}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        raise ConfigError(f"unknown config key(s) for {getattr(obj, '__qualname__', obj)}: "
                          + "; ".join(lines) + f". Accepted: {', '.join(sorted(names))}")


def instantiate_from_config(config: Mapping | DictConfig, where: str = "config", **extra: Any) -> Any:
    """Build `target(**params, **extra)`; unknown targets and unknown keys are errors that name them."""
    if config is None:
        raise ConfigError(f"{where} is empty; expected a mapping with 'target' and optional 'params'")
    if isinstance(config, str) and config in ("__is_first_stage__", "__is_unconditional__"):
        return None
    if "target" not in config:
        raise ConfigError(f"{where} has no 'target' key (keys: {', '.join(map(str, config.keys()))})")
    stray = [k for k in config.keys() if k not in ("target", "params")]
    if stray and not all(k in _TOP_LEVEL_EXTRAS for k in stray):
        bad = [k for k in stray if k not in _TOP_LEVEL_EXTRAS]
        raise ConfigError(f"{where}: unknown key(s) {bad} beside 'target'/'params'")
    obj = get_obj_from_str(config["target"])
    params = config.get("params", None) or {}
    if isinstance(params, DictConfig):
        params = OmegaConf.to_container(params, resolve=True)
    params = dict(params)
    params.update(extra)
    check_params(obj, params, where)
    return obj(**params)


# Keys CompVis configs put beside target/params (read by main.py, not passed to the class).
_TOP_LEVEL_EXTRAS = {"base_learning_rate"}


def count_params(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def default(value: Any, fallback: Any) -> Any:
    """`value` unless it is None."""
    return fallback if value is None else value


def with_base_signature(cls: type) -> type:
    """Class decorator: `cls(**params)` forwards what it does not name to its base class; give `cls` the signature
    of its own keyword-only parameters plus the base's, so config checks (`check_params`) name unknown keys."""
    own = [p for p in inspect.signature(cls.__init__).parameters.values() if p.kind == p.KEYWORD_ONLY]
    names = {p.name for p in own}
    base = [p.replace(kind=p.KEYWORD_ONLY) for p in inspect.signature(cls.__mro__[1]).parameters.values()
            if p.name not in names and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    cls.__signature__ = inspect.Signature(base + own)
    return cls


def with_params_when_restored(config: Mapping | DictConfig) -> Mapping:
    """A {target, params} config whose class declares `params_when_restored` (the params that build it without
    loading pretrained weights, e.g. {"pretrained": False}) with those set; any other config unchanged. For frozen
    modules whose weights a checkpoint brings (ldm.load_model, a latent diffusion model's ckpt_path)."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    if not isinstance(config, Mapping) or not isinstance(config.get("target"), str):
        return config
    from ldm.compat import ALIASES  # compat imports this module
    target = config["target"]
    cls = get_obj_from_str(ALIASES[target].target if target in ALIASES else target)
    extra = getattr(cls, "params_when_restored", None)
    if not extra:
        return config
    return {**config, "params": {**(config.get("params") or {}), **extra}}

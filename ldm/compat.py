"""CompVis / Stable Diffusion config targets -> our classes: ONE alias table, and config translation.

Original YAML files name classes of the CompVis repositories (`ldm.models.diffusion.ddpm.LatentDiffusion`,
`taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator`, ...). `ldm.util.get_obj_from_str` asks
`resolve_target` first, so those files instantiate our classes unchanged. An entry maps one original class;
where its parameter names differ from ours it carries a small translation (drop / rename / defaults / fixed
values / a last value-dependent step). Targets whose path is the same here (`ldm.models.autoencoder.AutoencoderKL`,
`VQModel`, `VQModelInterface`) need no entry. Adding a class is one entry (StableSR's are).
"""
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from omegaconf import DictConfig, OmegaConf

from ldm.util import ConfigError


@dataclass(frozen=True)
class Alias:
    """How one original class maps onto ours. Translation order: drop, rename, defaults, fixed, translate."""

    target: str                                                      # our class (dotted path)
    drop: tuple[str, ...] = ()                                       # original params with no counterpart: ignored
    rename: Mapping[str, str] = field(default_factory=dict)          # original name -> our name
    defaults: Mapping[str, Any] = field(default_factory=dict)        # the original's defaults where ours differ
    fixed: Mapping[str, Any] = field(default_factory=dict)           # set by the alias; a config may only repeat them
    translate: Callable[[dict], dict] | None = None                  # value-dependent step on the translated params
    consumes: tuple[str, ...] = ()                                   # original params only `translate` reads


def _clip_params(params: dict) -> dict:
    """SD's FrozenCLIPEmbedder: `layer` last | hidden (+ layer_idx -2 = penultimate) | pooled; the tokenizer is
    always that of `version` (also when the model is built from its config, pretrained=False)."""
    layer, layer_idx = params.get("layer", "last"), params.pop("layer_idx", None)
    if layer == "hidden":
        if layer_idx != -2:
            raise ConfigError(f"FrozenCLIPEmbedder: layer='hidden' with layer_idx={layer_idx!r} is not supported; "
                              "only layer_idx=-2 (the penultimate layer, layer: penultimate here)")
        params["layer"] = "penultimate"
    elif layer == "pooled":
        raise ConfigError("FrozenCLIPEmbedder: layer='pooled' (one pooled token) is not supported; "
                          "use 'last' or 'penultimate'")
    if params.get("tokenizer") is None and isinstance(params.get("version"), str):
        params["tokenizer"] = params["version"]
    return params


def _stablesr_params(params: dict) -> dict:
    """StableSR's LatentDiffusionSRTextWT: options of its training recipe that this port does not implement must
    keep their released (neutral) values; the data-side options (USM sharpening, random crop sizes) are dropped:
    they belong to the training data (degradation pipeline), not to the model."""
    timesteps = params.get("timesteps", 1000)
    unsupported = {"unfrozen_diff": (params.pop("unfrozen_diff", False), (False,)),
                   "test_gt": (params.pop("test_gt", False), (False,)),
                   "p2_gamma": (params.pop("p2_gamma", None), (None,)),
                   "p2_k": (params.pop("p2_k", None), (None,)),
                   "mix_ratio": (params.pop("mix_ratio", 0.0), (0, 0.0)),
                   "time_replace": (params.pop("time_replace", None), (None, timesteps))}
    bad = {k: v for k, (v, ok) in unsupported.items() if v not in ok}
    if bad:
        raise ConfigError(f"LatentDiffusionSRTextWT: {bad} not supported (the released configs use unfrozen_diff "
                          "False, test_gt False, p2_gamma/p2_k null, mix_ratio 0, time_replace = timesteps)")
    return params


_LOSSES = "ldm.losses.autoencoder_loss"
ALIASES: dict[str, Alias] = {
    # diffusion models
    "ldm.models.diffusion.ddpm.DDPM": Alias("ldm.models.ddpm.DDPM"),
    "ldm.models.diffusion.ddpm.LatentDiffusion": Alias("ldm.models.latent_diffusion.LatentDiffusion"),
    "ldm.lr_scheduler.LambdaLinearScheduler": Alias("ldm.models.ddpm.linear_cycle_schedule"),
    # StableSR (IceClear/StableSR): the SR model, its SFT U-Net and time-aware encoder (released init: not zero).
    # Its CFW autoencoder `ldm.models.autoencoder.AutoencoderKLResi` needs an entry only if ours lives elsewhere.
    "ldm.models.diffusion.ddpm.LatentDiffusionSRTextWT": Alias(
        "ldm.models.stablesr.StableSR", drop=("random_size", "use_usm"), translate=_stablesr_params,
        consumes=("unfrozen_diff", "test_gt", "p2_gamma", "p2_k", "mix_ratio", "time_replace")),
    "ldm.modules.diffusionmodules.openaimodel.UNetModelDualcondV2": Alias(
        "ldm.modules.stablesr.SFTUNetModel", defaults={"sft_form": "spade", "sft_zero_init": False}),
    "ldm.modules.diffusionmodules.openaimodel.EncoderUNetModelWT": Alias("ldm.modules.stablesr.TimeAwareEncoder"),
    # networks
    "ldm.modules.diffusionmodules.openaimodel.UNetModel": Alias("ldm.modules.diffusionmodules.unet.UNetModel"),
    "ldm.modules.diffusionmodules.model.Encoder": Alias("ldm.modules.autoencoder.model.Encoder"),
    "ldm.modules.diffusionmodules.model.Decoder": Alias("ldm.modules.autoencoder.model.Decoder"),
    # conditioners (`device`: ours follow the module's .to())
    "ldm.modules.encoders.modules.ClassEmbedder": Alias("ldm.modules.encoders.class_embedder.ClassEmbedder",
                                                        defaults={"key": "class"}),
    "ldm.modules.encoders.modules.BERTEmbedder": Alias("ldm.modules.encoders.transformer_text.TransformerTextEmbedder",
                                                       drop=("device",)),
    "ldm.modules.encoders.modules.SpatialRescaler": Alias("ldm.modules.encoders.rescaler.SpatialRescaler"),
    "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder": Alias("ldm.modules.encoders.openclip.FrozenOpenCLIPEmbedder",
                                                                 drop=("device",)),
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder": Alias(
        "ldm.modules.encoders.text.FrozenTextEmbedder", drop=("device",),
        defaults={"version": "openai/clip-vit-large-patch14"}, fixed={"model_class": "clip"},
        translate=_clip_params, consumes=("layer_idx",)),
    # first-stage training losses
    "ldm.modules.losses.LPIPSWithDiscriminator": Alias(f"{_LOSSES}.LPIPSWithDiscriminator"),
    "ldm.modules.losses.contperceptual.LPIPSWithDiscriminator": Alias(f"{_LOSSES}.LPIPSWithDiscriminator"),
    "ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator": Alias(f"{_LOSSES}.VQLPIPSWithDiscriminator"),
    "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator": Alias(f"{_LOSSES}.VQLPIPSWithDiscriminator"),
}

# Packages that exist only in the original repositories: a target there without an entry is unsupported.
ORIGINAL_PACKAGES = ("ldm.models.diffusion.", "ldm.modules.encoders.modules.", "ldm.modules.losses.",
                     "ldm.modules.diffusionmodules.openaimodel.", "ldm.modules.diffusionmodules.model.",
                     "ldm.modules.diffusionmodules.upscaling.", "ldm.modules.diffusionmodules.util.",
                     "ldm.modules.attention.", "ldm.modules.x_transformer.", "ldm.modules.image_degradation.",
                     "ldm.modules.midas.", "ldm.lr_scheduler.", "taming.")


def is_original_target(path: str) -> bool:
    """Whether `path` names a class of the original CompVis/SD/taming code (supported or not)."""
    return path in ALIASES or path.startswith(ORIGINAL_PACKAGES)


def supported_targets() -> list[str]:
    return sorted(ALIASES)


def translate_params(path: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The original class' params -> ours (for a target of the table)."""
    alias, out = ALIASES[path], dict(params)
    for name in alias.drop:
        out.pop(name, None)
    for old, new in alias.rename.items():
        if old in out:
            if new in out:
                raise ConfigError(f"{path}: params {old!r} and {new!r} mean the same; give one")
            out[new] = out.pop(old)
    clash = {k: out[k] for k, v in alias.fixed.items() if k in out and out[k] != v}
    if clash:
        raise ConfigError(f"{path}: {clash} cannot be changed; this target means {dict(alias.fixed)} "
                          f"(use {alias.target} to choose freely)")
    out = {**alias.defaults, **out, **alias.fixed}
    return alias.translate(out) if alias.translate is not None else out


def _signature(alias: Alias, cls: Callable) -> inspect.Signature:
    """Our class' keyword parameters (with the original's defaults), minus the fixed ones, plus the original
    names the alias drops, renames or consumes: what `ldm.util.check_params` checks a config against."""
    params = []
    for p in inspect.signature(cls).parameters.values():
        if p.name in alias.fixed or p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL):
            continue
        kind = p.VAR_KEYWORD if p.kind == p.VAR_KEYWORD else p.KEYWORD_ONLY
        params.append(p.replace(kind=kind, default=alias.defaults.get(p.name, p.default)))
    named = {p.name for p in params}
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
             for n in (*alias.drop, *alias.rename, *alias.consumes) if n not in named]
    var_kw = [p for p in params if p.kind == p.VAR_KEYWORD]
    return inspect.Signature([p for p in params if p.kind != p.VAR_KEYWORD] + extra + var_kw)


@functools.lru_cache(maxsize=None)
def resolve_target(path: str) -> Any | None:
    """Our object for an original target; None for any other path (imported as usual).

    A table entry without translation gives our class itself; with one, a builder that translates the params
    and carries the accepted names as its signature. An original target without an entry is a ConfigError.
    """
    from ldm.util import get_obj_from_str  # ldm.util calls this function: import at use

    if path not in ALIASES:
        if is_original_target(path):
            raise ConfigError(f"target {path!r} (CompVis/SD) is not supported by ldm. Supported original targets: "
                              f"{', '.join(supported_targets())}; or name one of our classes directly")
        return None
    alias = ALIASES[path]
    obj = get_obj_from_str(alias.target)
    if not (alias.drop or alias.rename or alias.defaults or alias.fixed or alias.translate or alias.consumes):
        return obj

    def build(**params: Any) -> Any:
        return obj(**translate_params(path, params))

    build.__signature__ = _signature(alias, obj)
    build.__name__ = build.__qualname__ = f"{obj.__name__} (as {path})"
    build.__doc__ = f"{alias.target} built from the params of {path}."
    return build


def native_config(config: Mapping | DictConfig) -> dict:
    """A copy of a config tree with every original target replaced by ours and its params translated, so it
    names only our classes (e.g. to save beside a converted checkpoint)."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    return _native(config)


def _native(node: Any) -> Any:
    if isinstance(node, Mapping):
        out = {k: _native(v) for k, v in node.items()}
        target = out.get("target")
        if isinstance(target, str) and target in ALIASES:
            out["target"] = ALIASES[target].target
            out["params"] = translate_params(target, out.get("params") or {})
        return out
    if isinstance(node, (list, tuple)):
        return [_native(v) for v in node]
    return node

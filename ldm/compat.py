"""CompVis / Stable Diffusion config targets -> our classes: ONE alias table, and config translation.

Original YAML files name classes of the CompVis repositories (`ldm.models.diffusion.ddpm.LatentDiffusion`,
`taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator`, ...). `ldm.util.get_obj_from_str` asks
`resolve_target` first, so those files instantiate our classes unchanged. An entry maps one original class;
where its parameter names differ from ours it carries a small translation (drop / rename / defaults / fixed
values / a last value-dependent step). Targets whose path is the same here (`ldm.models.autoencoder.AutoencoderKL`,
`VQModel`, `VQModelInterface`) need no entry. Adding a class is one entry (StableSR's are).

Every target of the published latent-diffusion / SD 1.x configs is served (tests/test_compvis_configs.py):
models, networks, conditioners, first-stage losses, the three LR schedulers (ldm.lr_schedules), CompVis main.py's
data module and image logger. Two kinds only inference never uses are accepted without a counterpart: DummyLoss
(`Unserved`: builds, any use names it) and the original repositories' data sets (`ORIGINAL_DATA_PACKAGES`:
building one, i.e. training or testing on it, is a ConfigError naming it and ours to use instead).
"""
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch.nn as nn
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


def _rescaler_params(params: dict) -> dict:
    """CompVis' semantic-synthesis configs give SpatialRescaler one-hot maps of in_channels classes (182) for its
    channel mapper; here an integer label map is one-hot encoded to that many classes (n_classes)."""
    if params.get("n_classes") is None and params.get("out_channels") is not None \
            and params.get("in_channels", 3) > 3:
        params["n_classes"] = params["in_channels"]
    return params


def _data_module_params(params: dict) -> dict:
    """CompVis' main.DataModuleFromConfig: num_workers defaults to 2 * batch_size there; no predict section."""
    if params.get("num_workers") is None:
        params["num_workers"] = 2 * params["batch_size"]
    if params.pop("predict", None) is not None:
        raise ConfigError("data.params.predict: a predict section is not supported; use scripts/sample.py")
    if params.pop("shuffle_test_loader", False):
        raise ConfigError("data.params.shuffle_test_loader=true is not supported: the test loader keeps its order")
    return params


class Unserved(nn.Module):
    """Stands in for an original class that inference never calls (CompVis' DummyLoss: a training loss without a
    loss): it builds, holds no weights, and any call raises a ConfigError naming the original target."""

    def __init__(self, original_target: str):
        super().__init__()
        self.original_target = original_target

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError(f"{self.original_target} (CompVis) stands in for a part that only training uses and has "
                          "no counterpart in ldm; replace it in the config to train")


def _cfw_params(params: dict) -> dict:
    """StableSR's AutoencoderKLResi: on-the-fly degradation of CFW training data (synthesis_data, use_usm,
    test_gt) is not built in; the saved-triples data path (synthesis_data: false) is."""
    if params.pop("synthesis_data", False) or params.pop("test_gt", False):
        raise ConfigError("AutoencoderKLResi: synthesis_data / test_gt are not supported; train CFW on saved "
                          "(lq, gt, latent) triples (ldm.data.cfw_pairs.CFWPairs)")
    params.pop("use_usm", None)
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
_SCHEDULES = "ldm.lr_schedules"
ALIASES: dict[str, Alias] = {
    # diffusion models
    "ldm.models.diffusion.ddpm.DDPM": Alias("ldm.models.ddpm.DDPM"),
    "ldm.models.diffusion.ddpm.LatentDiffusion": Alias("ldm.models.latent_diffusion.LatentDiffusion"),
    # learning-rate schedules (pure functions of the step)
    "ldm.lr_scheduler.LambdaWarmUpCosineScheduler": Alias(f"{_SCHEDULES}.warmup_cosine_schedule"),
    "ldm.lr_scheduler.LambdaWarmUpCosineScheduler2": Alias(f"{_SCHEDULES}.cosine_cycle_schedule"),
    "ldm.lr_scheduler.LambdaLinearScheduler": Alias(f"{_SCHEDULES}.linear_cycle_schedule"),
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
    "ldm.modules.diffusionmodules.model.Decoder_Mix": Alias("ldm.modules.autoencoder.cfw.FusionDecoder"),
    # StableSR's CFW autoencoder (its lossconfig LPIPSWithDiscriminator becomes CFWLoss inside it)
    "ldm.models.autoencoder.AutoencoderKLResi": Alias("ldm.models.cfw.CFWAutoencoder", translate=_cfw_params,
                                                      consumes=("synthesis_data", "use_usm", "test_gt")),
    # conditioners (`device`: ours follow the module's .to())
    "ldm.modules.encoders.modules.ClassEmbedder": Alias("ldm.modules.encoders.class_embedder.ClassEmbedder",
                                                        defaults={"key": "class"}),
    "ldm.modules.encoders.modules.BERTEmbedder": Alias("ldm.modules.encoders.transformer_text.TransformerTextEmbedder",
                                                       drop=("device",)),
    "ldm.modules.encoders.modules.SpatialRescaler": Alias("ldm.modules.encoders.rescaler.SpatialRescaler",
                                                          translate=_rescaler_params),
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
    **{f"ldm.modules.losses.{m}.DummyLoss": Alias("ldm.compat.Unserved",
                                                  fixed={"original_target": f"ldm.modules.losses.{m}.DummyLoss"})
       for m in ("contperceptual", "vqperceptual")},
    # CompVis main.py: data module and image logger (ours, importable without a main.py on the path)
    "main.DataModuleFromConfig": Alias("ldm.data.datamodule.DataModuleFromConfig", drop=("use_worker_init_fn",),
                                       rename={"shuffle_val_dataloader": "shuffle_val"},
                                       defaults={"num_workers": None}, translate=_data_module_params,
                                       consumes=("predict", "shuffle_test_loader")),
    "main.ImageLogger": Alias("ldm.callbacks.ImageLogger", drop=("rescale", "log_on_batch_idx")),
}

# Data sets of the original repositories (their own download and preparation code): accepted in a config,
# not read for inference; building one (training, testing) is a ConfigError naming it.
ORIGINAL_DATA_PACKAGES = ("ldm.data.base.", "ldm.data.imagenet.", "ldm.data.lsun.", "ldm.data.openimages.",
                          "ldm.data.faceshq.", "ldm.data.landscapes.", "ldm.data.previews.", "ldm.data.coco.",
                          "ldm.data.laion.", "taming.data.")
OUR_DATA_SETS = ("ldm.data.image_folder.ImageFolder (a folder of images; class sub-folders, captions, boxes)",
                 "ldm.data.tasks.SuperResolution / Inpainting (wrapping a data set)")

# Packages that exist only in the original repositories: a target there without an entry is unsupported.
ORIGINAL_PACKAGES = ("ldm.models.diffusion.", "ldm.modules.encoders.modules.", "ldm.modules.losses.",
                     "ldm.modules.diffusionmodules.openaimodel.", "ldm.modules.diffusionmodules.model.",
                     "ldm.modules.diffusionmodules.upscaling.", "ldm.modules.diffusionmodules.util.",
                     "ldm.modules.attention.", "ldm.modules.x_transformer.", "ldm.modules.image_degradation.",
                     "ldm.modules.midas.", "ldm.lr_scheduler.", "taming.")


def is_original_target(path: str) -> bool:
    """Whether `path` names a class of the original CompVis/SD/taming code (supported or not)."""
    return path in ALIASES or path.startswith(ORIGINAL_PACKAGES) or is_original_data(path)


def is_original_data(path: str) -> bool:
    """Whether `path` names a data set of the original repositories (`ldm.data.imagenet.ImageNetTrain`, ...)."""
    return path.startswith(ORIGINAL_DATA_PACKAGES)


def _data_set_error(path: str) -> ConfigError:
    return ConfigError(f"data set {path!r} belongs to the original CompVis repositories (their download and "
                       f"preparation code), which ldm does not include; it is not needed for inference. To train "
                       f"or test, point this data section at one of ours: {'; '.join(OUR_DATA_SETS)}")


def original_targets_outside_model(config: Mapping | DictConfig) -> list[str]:
    """Notes on the original data / callback targets of a config's non-model sections (what inference skips)."""
    notes: list[str] = []
    if isinstance(config, DictConfig):  # unresolved: missing values (???) and interpolations stay as text
        config = OmegaConf.to_container(config, resolve=False)

    def walk(node: Any, where: str) -> None:
        if isinstance(node, Mapping):
            target = node.get("target")
            if isinstance(target, str) and is_original_target(target):
                kind = "a data set of the original repositories" if is_original_data(target) else \
                    f"mapped to {ALIASES[target].target}" if target in ALIASES else "not supported by ldm"
                notes.append(f"{where}.target={target}: {kind}; not read for inference")
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    for section, node in config.items():
        if section != "model":
            walk(node, str(section))
    return notes


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
    and carries the accepted names as its signature. An original data set gives a builder that raises a
    ConfigError naming it. Any other original target without an entry is a ConfigError.
    """
    from ldm.util import get_obj_from_str  # ldm.util calls this function: import at use

    if is_original_data(path):
        def unavailable(**params: Any) -> Any:
            raise _data_set_error(path)

        unavailable.__name__ = unavailable.__qualname__ = f"{path} (original data set)"
        return unavailable
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

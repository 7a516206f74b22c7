"""Key mapping between two state-dict layouts, module by module.

A layout pair is a list of ModulePair(ours, theirs, kind): the module at prefix `ours` in our (CompVis) layout is
the module at `theirs` in the other one, and `kind` says how the tensors inside map (renamed sub-modules, 1x1 convs
as linear layers, a fused qkv as three projections). `to_theirs` / `to_ours` apply the list to a whole state dict;
a key that no pair covers is a ConversionError naming it and its file. Tensors that only change name are passed
through as the same objects, so a round trip is bit-exact.
"""
from dataclasses import dataclass, field
from typing import Mapping

import torch

StateDict = dict[str, torch.Tensor]


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message names the file and the key or setting."""


class Kind:
    """How the tensors of one module map (keys relative to the module)."""

    def to_theirs(self, sub: StateDict) -> StateDict:
        raise NotImplementedError

    def to_ours(self, sub: StateDict) -> StateDict:
        raise NotImplementedError


def _rename(sub: StateDict, names: Mapping[str, str], passthrough: bool) -> StateDict:
    """Rename each key's sub-module prefix by `names` ({'in_layers.0': 'norm1'}); the tensor name is kept.
    A key outside `names` raises KeyError(key) unless `passthrough`."""
    out = {}
    for key, value in sub.items():
        module, _, tensor = key.rpartition(".")
        if module in names:
            out[f"{names[module]}.{tensor}" if names[module] else tensor] = value
        elif passthrough:
            out[key] = value
        else:
            raise KeyError(key)
    return out


@dataclass(frozen=True)
class Renamed(Kind):
    """Sub-modules renamed (`names`: ours -> theirs); with passthrough, other keys keep their names."""

    names: Mapping[str, str] = field(default_factory=dict)
    passthrough: bool = False

    def to_theirs(self, sub: StateDict) -> StateDict:
        return _rename(sub, self.names, self.passthrough)

    def to_ours(self, sub: StateDict) -> StateDict:
        return _rename(sub, {v: k for k, v in self.names.items()}, self.passthrough)


SAME = Renamed(passthrough=True)


@dataclass(frozen=True)
class ConvAsLinear(Kind):
    """Renamed sub-modules whose weights are 1x1 convolutions in our layout (`conv_dims` 1 or 2 spatial dims)
    and linear layers in theirs: (C_out, C_in, 1[, 1]) <-> (C_out, C_in)."""

    names: Mapping[str, str]
    convs: tuple[str, ...]                              # our sub-modules that are 1x1 convs
    conv_dims: int = 2

    def to_theirs(self, sub: StateDict) -> StateDict:
        out = {}
        for key, value in sub.items():
            if key.rpartition(".")[0] in self.convs and key.endswith(".weight"):
                value = value.reshape(value.shape[:2])                          # (C_out, C_in)
            out.update(_rename({key: value}, self.names, False))
        return out

    def to_ours(self, sub: StateDict) -> StateDict:
        out = _rename(sub, {v: k for k, v in self.names.items()}, False)
        for key, value in out.items():
            if key.rpartition(".")[0] in self.convs and key.endswith(".weight") and value.ndim == 2:
                out[key] = value.reshape(*value.shape, *(1,) * self.conv_dims)  # (C_out, C_in, 1[, 1])
        return out


@dataclass(frozen=True)
class ModulePair:
    ours: str          # module prefix in our layout
    theirs: str        # the same module's prefix in the other layout
    kind: Kind = SAME


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _group(sd: Mapping[str, torch.Tensor], prefixes: Mapping[str, ModulePair], source: str,
           layout: str) -> dict[str, tuple[ModulePair, StateDict]]:
    """Each key under the longest prefix of `prefixes` that covers it, relative to it."""
    groups: dict[str, tuple[ModulePair, StateDict]] = {}
    for key, value in sd.items():
        parts = key.split(".")
        for n in range(len(parts) - 1, -1, -1):
            prefix = ".".join(parts[:n])
            if prefix in prefixes:
                groups.setdefault(prefix, (prefixes[prefix], {}))[1][".".join(parts[n:])] = value
                break
        else:
            raise ConversionError(f"{source}: unknown key {key!r}: no module of the {layout} layout that this "
                                  f"converter knows (is it the right model type and config?)")
    return groups


def _apply(sd: Mapping[str, torch.Tensor], pairs: list[ModulePair], source: str, forward: bool) -> StateDict:
    src = {(p.ours if forward else p.theirs): p for p in pairs}
    layout = "ldm (CompVis)" if forward else "diffusers"
    out: StateDict = {}
    for prefix, (pair, sub) in _group(sd, src, source, layout).items():
        try:
            mapped = pair.kind.to_theirs(sub) if forward else pair.kind.to_ours(sub)
        except KeyError as err:
            raise ConversionError(f"{source}: unknown key {_join(prefix, err.args[0])!r}: not part of the "
                                  f"{layout} layout of this module") from None
        dst = pair.theirs if forward else pair.ours
        out.update({_join(dst, k): v for k, v in mapped.items()})
    return out


def to_theirs(sd: Mapping[str, torch.Tensor], pairs: list[ModulePair], source: str = "state dict") -> StateDict:
    """Our layout -> theirs."""
    return _apply(sd, pairs, source, forward=True)


def to_ours(sd: Mapping[str, torch.Tensor], pairs: list[ModulePair], source: str = "state dict") -> StateDict:
    """Their layout -> ours."""
    return _apply(sd, pairs, source, forward=False)


def with_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {prefix + k: v for k, v in sd.items()}


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """The keys under `prefix`, without it."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def check_shapes(expected: Mapping[str, tuple], sd: Mapping[str, torch.Tensor], source: str, model: str,
                 prefix: str = "") -> None:
    """ConversionError listing missing / unexpected keys and shape mismatches (both shapes) of `sd` against
    `expected`, keys named as in the file (with `prefix`)."""
    from ldm.checkpoint import compare_state_dict

    report = compare_state_dict(with_prefix(expected, prefix), with_prefix(sd, prefix))
    if not report.ok:
        lines = report.describe(source, model).splitlines()
        advice = ("  What to do: check that the config describes this file's model (channels, levels, heads, "
                  "context_dim, embed_dim); the converter does not skip or guess weights")
        raise ConversionError("\n".join([line for line in lines if not line.startswith("  What to do")] + [advice]))


def meta_state_dict(build) -> StateDict:
    """The state dict of the module `build()` makes, built on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        module = build()
    return module.state_dict()


def shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}

"""Checkpoint files: safe reading of `.ckpt`/`.pt` (weights-only unpickling) and `.safetensors`, atomic saving,
and the key-matching report (missing / unexpected keys grouped by prefix, shape mismatches with both shapes).
"""
import contextlib
import contextvars
import logging
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

try:
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # numpy < 2
    from numpy.core.multiarray import scalar as _numpy_scalar

log = logging.getLogger(__name__)

UNSAFE_PICKLE_FLAGS = "allow_pickle=True (CLI: --unsafe-pickle)"
# set by unsafe_pickle_allowed(): the opt-in of a whole command (main.py --unsafe-pickle), for reads deep inside
# model constructors (`ckpt_path` of a config) that have no allow_pickle argument of their own
_UNSAFE_OPT_IN = contextvars.ContextVar("ldm_unsafe_pickle", default=False)


@contextlib.contextmanager
def unsafe_pickle_allowed(allowed: bool = True):
    """Within the block every read_checkpoint allows arbitrary unpickling when `allowed` (trusted files only)."""
    token = _UNSAFE_OPT_IN.set(bool(allowed))
    try:
        yield
    finally:
        _UNSAFE_OPT_IN.reset(token)


class UnsafeCheckpointError(RuntimeError):
    """The file holds Python objects that only arbitrary (code-executing) unpickling can rebuild."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, lost mount); the file it was to replace is unchanged."""


class CheckpointMismatchError(RuntimeError):
    """A state dict does not fit the model; `.report` has the details."""

    def __init__(self, message: str, report: "KeyReport | None" = None):
        super().__init__(message)
        self.report = report


class InertObject:
    """Stands in for the Lightning 1.x objects (ModelCheckpoint) some published `.ckpt` files pickle beside the
    weights: built without running any of that class' code; its pickled state is kept as plain data."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "InertObject":
        return super().__new__(cls)

    def __setstate__(self, state: Any) -> None:
        self.state = state


# Non-weight globals of CompVis / SD 1.x files (Lightning 1.x callback states, numpy scalars), allowed to
# weights-only unpickling: numpy rebuilds plain values; Lightning objects become InertObject.
_METADATA_GLOBALS = [
    (InertObject, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (np.dtype, "numpy.dtype"),
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    (_numpy_scalar, "numpy._core.multiarray.scalar"),
] + [(cls, f"numpy.dtypes.{name}") for name, cls in vars(np.dtypes).items() if name.endswith("DType")]
# Phrases of torch's weights-only unpickler when a file needs a global it may not load.
_UNSAFE_PHRASES = ("Unsupported global", "unrecognized function", "Can only build", "Can only create new object",
                   "is blocked")


def _require_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist"
                                + (" (it is a folder)" if os.path.isdir(path) else ""))
    return path


def read_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> Any:
    """The object stored in `path`: a `.safetensors` state dict, or what `torch.save` wrote (on the CPU).

    Pickle files are read with `torch.load(weights_only=True)`: tensors and plain containers only (plus the
    inert metadata of Lightning 1.x files). A file needing arbitrary unpickling raises UnsafeCheckpointError
    unless allow_pickle=True (or inside unsafe_pickle_allowed()), which runs whatever code the file names: only
    for files you trust.
    """
    path = _require_file(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    if allow_pickle or _UNSAFE_OPT_IN.get():
        log.warning("unpickling %s with allow_pickle=True: any code in the file runs (trusted files only)", path)
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_METADATA_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if any(p in str(err) for p in _UNSAFE_PHRASES):
            raise UnsafeCheckpointError(_unsafe_message(path, str(err))) from None
        raise RuntimeError(f"checkpoint {path!r} is not a readable torch checkpoint: {err}") from err
    except Exception as err:  # zip / legacy-format errors of all kinds (KeyError, EOFError, RuntimeError, ...)
        raise RuntimeError(f"checkpoint {path!r} is not a readable torch checkpoint (truncated, or another "
                           f"format?): {type(err).__name__}: {err}") from err


def _unsafe_message(path: str, torch_message: str) -> str:
    try:
        with torch.serialization.safe_globals(_METADATA_GLOBALS):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) files cannot be inspected: take the name from torch's message
        names = re.findall(r"GLOBAL (\S+)|unrecognized function (\S+)", torch_message)
        names = [a or b for a, b in names]
    found = f" ({', '.join(names)})" if names else ""
    return (f"checkpoint {path!r} was refused: it contains Python objects{found} that only arbitrary unpickling "
            f"can rebuild. Unpickling runs code chosen by whoever made the file (it could delete or upload your "
            f"files). Pass {UNSAFE_PICKLE_FLAGS} only if you trust its source; better, convert it once on a "
            f"trusted machine to .safetensors (ldm.checkpoint.save_safetensors).")


def state_dict_shapes(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """key -> shape of a checkpoint's weights (as read_state_dict finds them), read memory-mapped where the
    format allows, so even a large file is not copied into memory."""
    path = _require_file(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    try:
        with torch.serialization.safe_globals(_METADATA_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=not (allow_pickle or _UNSAFE_OPT_IN.get()),
                             mmap=True)
        sd = obj["state_dict"] if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping) else obj
        if isinstance(sd, Mapping) and all(isinstance(v, torch.Tensor) for v in sd.values()):
            return {k: tuple(v.shape) for k, v in sd.items()}
    except Exception:  # legacy (non-zip) files, unsafe pickles, ...: read_state_dict gives the precise error
        pass
    return {k: tuple(v.shape) for k, v in read_state_dict(path, allow_pickle=allow_pickle).items()}


def read_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint: its `state_dict` entry (Lightning / CompVis `.ckpt`), or the file itself when it
    is a bare state dict (`.pt`, `.safetensors`)."""
    obj = read_checkpoint(path, allow_pickle=allow_pickle)
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {os.fspath(path)!r} holds a {type(obj).__name__}, not a state dict")
    if "global_step" in obj:
        log.info("checkpoint %s: global_step %s", os.fspath(path), obj["global_step"])
    sd = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint {os.fspath(path)!r}: entries {bad[:5]} are not tensors; expected a dict with "
                         f"a 'state_dict' entry or a bare state dict (top-level keys: {sorted(obj)[:10]})")
    return dict(sd)


# ---- saving ------------------------------------------------------------------------------------------------------
def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """write(temp) into a temporary file beside `path`, flushed to disk, then renamed over `path` (os.replace):
    readers see the old file or the complete new one, never a partial file."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save(obj, path) through a temporary file in the same folder and os.replace."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_text_atomic(text: str, path: str | os.PathLike) -> None:
    """A text file (a config next to converted weights) written through a temporary file and os.replace."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _atomic_write(path, write)


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """A state dict as `.safetensors` (atomically). Every key is kept: tensors that share memory (a module
    registered twice, e.g. `__is_first_stage__`) are written as copies."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    tensors = {}
    for key, value in state_dict.items():
        t = value.detach().cpu().contiguous()
        ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        tensors[key] = t.clone() if ident in seen and t.numel() else t
        seen.add(ident)
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=dict(metadata) if metadata else None))


# ---- key matching ------------------------------------------------------------------------------------------------
@dataclass
class KeyReport:
    """How a state dict fits a model: what is missing, unexpected, of the wrong shape; what the rules did."""

    missing: list[str] = field(default_factory=list)                       # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)                    # in the file, not in the model
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, file shape, model shape)
    notes: list[str] = field(default_factory=list)                         # rules applied, for the info log

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, source: str, model_name: str) -> str:
        """A message a user can act on."""
        lines = [f"checkpoint {source!r} does not fit {model_name}:"]
        if self.missing:
            lines.append(f"  {len(self.missing)} missing key(s) (in the model, not in the file):")
            lines += [f"    {g}" for g in group_keys(self.missing, "missing")]
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected key(s) (in the file, not in the model):")
            lines += [f"    {g}" for g in group_keys(self.unexpected, "unexpected")]
        if self.mismatched:
            lines.append(f"  {len(self.mismatched)} shape mismatch(es):")
            lines += [f"    {k}: file {tuple(f)}, model {tuple(m)}" for k, f, m in self.mismatched[:20]]
            if len(self.mismatched) > 20:
                lines.append(f"    ... and {len(self.mismatched) - 20} more")
        return "\n".join(lines + ["  What to do: " + hint for hint in self.hints()])

    def hints(self) -> list[str]:
        hints = []
        shift = _prefix_shift(self.missing, self.unexpected)
        if shift:
            hints.append(shift)
        if self.mismatched:
            hints.append("shape mismatches mean the config describes another architecture than the file: compare "
                         "channels / channel_mult / context_dim / in_channels / embed_dim / n_embed with the file's")
        if self.missing or self.unexpected:
            hints.append("check that the config is the one the file was trained with; strict=False loads the "
                         "matching keys anyway (missing ones keep their initial values)")
        return hints


def _prefix_shift(missing: list[str], unexpected: list[str]) -> str | None:
    """A hint when the file's keys are the model's with a prefix added or removed."""
    if not missing or not unexpected:
        return None
    m, u = missing[0], next((k for k in unexpected if k.endswith(missing[0].split(".")[-1])), unexpected[0])
    if m.endswith("." + u):
        return f"the file's keys lack the prefix {m[: -len(u)]!r} (e.g. {u!r} vs the model's {m!r})"
    if u.endswith("." + m):
        return f"the file's keys carry an extra prefix {u[: -len(m)]!r} (e.g. {u!r} vs the model's {m!r})"
    return None


def _group(key: str) -> str:
    """`first_stage_model.decoder.up.0.block.1.conv1.weight` -> `first_stage_model.decoder.up.*`;
    without an index, the key's module: `first_stage_model.quant_conv.weight` -> `first_stage_model.quant_conv.*`."""
    parts = key.split(".")
    numeric = next((i for i, p in enumerate(parts) if re.fullmatch(r"\d+", p)), None)
    if numeric is not None:
        return ".".join(parts[:numeric]) + ".*"
    return ".".join(parts[:-1]) + ".*" if len(parts) > 1 else key


def group_keys(keys: Iterable[str], what: str, limit: int = 20) -> list[str]:
    """Lines `prefix.*: N <what> (e.g. first.key)` in order of first appearance; a lone key is shown whole."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(_group(key), []).append(key)
    lines = [f"{members[0]}" if len(members) == 1 else f"{prefix}: {len(members)} {what} (e.g. {members[0]})"
             for prefix, members in groups.items()]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more group(s)"]
    return lines


def compare_state_dict(expected: Mapping[str, torch.Size | tuple],
                       found: Mapping[str, torch.Tensor | torch.Size | tuple]) -> KeyReport:
    """Missing / unexpected keys and shape mismatches of `found` (a file's state dict, or its key -> shape)
    against `expected` (the model's key -> shape)."""
    report = KeyReport()
    report.missing = [k for k in expected if k not in found]
    report.unexpected = [k for k in found if k not in expected]
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in found.items()}
    report.mismatched = [(k, shape, tuple(expected[k])) for k, shape in shapes.items()
                         if k in expected and shape != tuple(expected[k])]
    return report

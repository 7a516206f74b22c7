"""The evaluation protocol record: what was measured, how, on what, with which network, when and where.

Saved as JSON beside the numbers so a FID is reproducible: sample count, sampler, steps, eta,
guidance scale, seed, image size, feature extractor name and its weights' SHA-256, data split,
date and machine. For first-stage reconstructions (rFID, PSNR) use sampler "reconstruction", steps 0.
"""
import datetime
import json
import os
import platform
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ldm.eval.metrics import METRIC_DEFINITIONS


def machine_description() -> str:
    """Host, OS, Python/torch versions and the accelerator (or CPU thread count)."""
    if torch.cuda.is_available():
        device = f"cuda {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return (f"{platform.node()} | {platform.system()} {platform.release()} | python {platform.python_version()} | "
            f"torch {torch.__version__} | {device}")


def now_iso() -> str:
    """Current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


_TYPES: dict[str, type | tuple[type, ...]] = {
    "num_samples": int, "sampler": str, "steps": int, "eta": (int, float), "guidance_scale": (int, float),
    "seed": int, "image_size": int, "sigma_schedule": str, "feature_extractor": str, "feature_extractor_sha256": str,
    "data_split": str, "dataset": str, "checkpoint": str, "notes": str, "date": str, "machine": str,
    "metrics": dict, "definitions": dict,
}


@dataclass
class EvalProtocol:
    """One evaluation run's protocol; `metrics` holds its results, `definitions` how each was computed."""
    num_samples: int                  # generated (or reconstructed) images scored
    sampler: str                      # e.g. "ddim", "plms", "dpmpp_2m", "reconstruction"
    steps: int                        # sampler steps (0 for reconstructions)
    eta: float                        # DDIM eta (0 deterministic)
    guidance_scale: float             # classifier-free guidance s (1.0 = none)
    seed: int                         # seed of the sampling noise
    image_size: int                   # side of the scored images in pixels
    feature_extractor: str            # extractor name (ldm.eval.features), e.g. Inception or the Shapes probe
    feature_extractor_sha256: str     # SHA-256 of the extractor's weights file
    data_split: str                   # reference split, e.g. "validation"
    dataset: str = ""                 # reference data set, e.g. "Shapes(max_objects=2)"
    checkpoint: str = ""              # the evaluated model's checkpoint file
    notes: str = ""                   # anything else a reader needs (baselines, metric variants)
    sigma_schedule: str = ""          # a sigma sampler's noise levels (uniform, karras, exponential); "" otherwise
    date: str = field(default_factory=now_iso)
    machine: str = field(default_factory=machine_description)
    metrics: dict[str, float] = field(default_factory=dict)
    definitions: dict[str, str] = field(default_factory=lambda: dict(METRIC_DEFINITIONS))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every field has its declared type (ints are accepted for floats); errors name the field."""
        for f in fields(self):
            value, kind = getattr(self, f.name), _TYPES[f.name]
            if not isinstance(value, kind) or isinstance(value, bool):  # no field is a bool
                raise TypeError(f"EvalProtocol.{f.name} must be {kind}, got {type(value).__name__} {value!r}")
        for key, value in self.metrics.items():
            if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"EvalProtocol.metrics[{key!r}] must map a str to a number, got {value!r}")
        if self.num_samples < 0 or self.steps < 0 or self.image_size <= 0:
            raise ValueError(f"EvalProtocol: need num_samples >= 0, steps >= 0, image_size > 0, got "
                             f"{self.num_samples}, {self.steps}, {self.image_size}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the record as JSON (creating folders); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "EvalProtocol") -> "EvalProtocol":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{where}: unknown protocol key(s) {unknown}; known: {sorted(names)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EvalProtocol":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"EvalProtocol.load: {path} is not valid JSON ({err})") from err
        return cls.from_dict(data, where=str(path))


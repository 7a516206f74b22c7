"""The sampling command line (scripts/sample.py): load a trained model from a run directory or a config and
checkpoint, sample each condition (ldm.sampling_conditions) in seeded batches, and write one PNG per sample,
a grid with one row per condition and samples.json.

Sample i (row-major: condition by condition) starts from noise seeded with seed + i, drawn on the CPU (the same
noise on every device); under a deterministic sampler (DDIM with eta 0, PLMS, Euler, Heun, DPM++ 2M, UniPC) it
does not depend on the batch it ran in, so any sample is reproduced alone from its recorded seed.

--init-image (img2img, any model) starts from that picture noised to --strength, with the sample's noise;
--mask with it regenerates only the mask's white region (blended at every step, then the known pixels pasted
back). An inpainting-trained model keeps taking --image and --mask as its condition.
"""
import argparse
import datetime
import glob
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from ldm.checkpoint import CheckpointMismatchError, UnsafeCheckpointError
from ldm.diffusion.editing import known_mask_at
from ldm.diffusion.sampling import (DISCRETE_SAMPLERS, SAMPLERS, SIGMA_SAMPLERS, STOCHASTIC_SIGMA_SAMPLERS,
                                    resolve_eta)
from ldm.diffusion.sigma_schedules import SIGMA_SCHEDULES
from ldm.loading import load_model
from ldm.sampling_conditions import Condition, SamplingError, model_kind, read_image, read_mask
from ldm.util import ConfigError

# what main() reports as one message (exit status 2) instead of a traceback
USER_ERRORS = (SamplingError, ConfigError, OSError, CheckpointMismatchError, UnsafeCheckpointError)


EPILOG = """\
the condition flag follows from the model's conditioner (a wrong or missing one is an error):
  unconditional                      (none)
  class (ClassEmbedder)              --class 3 circle ...       names: Shapes classes / image-folder sub-folders
  text (Frozen/TransformerText...)   --prompt "a red circle" --prompt ...   or   --prompts FILE (one per line)
  layout (LayoutEmbedder)            --layout '[["circle", 0.1, 0.1, 0.5, 0.5], [2, 0.6, 0.5, 0.9, 0.9]]'
  super-resolution / semantic map    --image lr.png ...  (a label map: one-channel PNG of class indices)
  inpainting                         --image photo.png --mask mask.png   (white = fill)
each value is one condition: one grid row of --n samples.

editing, any model (unconditional included): --init-image photo.png --strength 0.6   (img2img)
                                             --init-image photo.png --mask mask.png  (white = regenerate)

examples:
  python scripts/sample.py --run logs/<run> --prompt "a red circle" --n 8 --scale 3
  python scripts/sample.py --run logs/<run> --class star --sampler dpmpp_2m --schedule karras --steps 20
  python scripts/sample.py --run logs/<run> --init-image photo.png --strength 0.5 --sampler euler_a
  python scripts/sample.py --config configs/compvis/v1-inference.yaml --ckpt sd-v1-4.safetensors \\
      model.params.cond_stage_config.params.version=/models/clip-vit-large-patch14 --prompt "a photo of a cat"
"""


# ---- command line --------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample.py", allow_abbrev=False, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Sample images from a trained DDPM / latent-diffusion model.")
    model = p.add_argument_group("model")
    model.add_argument("--run", help="run directory of main.py: merges its configs/*-project.yaml and loads "
                                     "checkpoints/last.ckpt (or --ckpt)")
    model.add_argument("--config", nargs="+",
                       help="config YAML(s), ours or CompVis/SD, merged left to right (with --ckpt)")
    model.add_argument("--ckpt", help="checkpoint file (.ckpt, .pt, .safetensors)")
    model.add_argument("--unsafe-pickle", action="store_true",
                       help="allow arbitrary unpickling of the checkpoint: it can run code, trusted files only")
    model.add_argument("--no-ema", action="store_true", help="the training weights instead of the EMA weights")
    model.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: cuda if available, else mps, else cpu)")
    model.add_argument("overrides", nargs="*", metavar="key.path=value",
                       help="config overrides, e.g. model.params.cond_stage_config.params.version=/models/clip")
    s = p.add_argument_group("sampling")
    s.add_argument("--n", type=_positive_int, default=4, help="samples per condition (default 4)")
    s.add_argument("--sampler", choices=SAMPLERS, default="ddim",
                   help="ddpm|ddim|plms walk the model's timesteps; the others are sigma samplers (default ddim)")
    s.add_argument("--schedule", choices=SIGMA_SCHEDULES, default=None,
                   help="sigma samplers' noise levels (default karras; ddpm/ddim/plms use their own timesteps)")
    s.add_argument("--steps", type=_positive_int, default=50, help="sampler steps (DDPM runs every timestep)")
    s.add_argument("--eta", type=float, default=None,
                   help="noise of ddim (default 0: deterministic, 1 DDPM-like) and of euler_a, dpmpp_2s_a, "
                        "dpmpp_2m_sde (default 1; 0 makes them deterministic)")
    s.add_argument("--scale", type=float, default=1.0, help="classifier-free guidance scale (1: no guidance)")
    s.add_argument("--seed", type=int, default=0, help="sample i starts from noise seeded with seed + i")
    s.add_argument("--batch_size", type=_positive_int, default=8)
    s.add_argument("--outdir", help="default: <run>/samples/<now> with --run, else samples/<now>")
    c = p.add_argument_group("condition (which one the model takes: see below)")
    c.add_argument("--class", dest="classes", nargs="+", metavar="LABEL", help="class indices or names")
    c.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT", help="a caption (repeatable)")
    c.add_argument("--prompts", dest="prompts_file", metavar="FILE", help="captions, one per line")
    c.add_argument("--layout", dest="layouts", action="append", metavar="JSON|FILE",
                   help='objects [[class, x0, y0, x1, y1], ...], corners in [0, 1] (repeatable)')
    c.add_argument("--image", dest="images", nargs="+", metavar="PNG",
                   help="LR image (super-resolution), label map (semantic), or the picture to inpaint")
    c.add_argument("--mask", dest="masks", nargs="+", metavar="PNG",
                   help="inpainting mask, white = fill (the other pixels are kept): one, or one per --image; "
                        "with --init-image, any model")
    e = p.add_argument_group("editing (any model)")
    e.add_argument("--init-image", metavar="PNG", help="img2img: start from this picture noised to --strength")
    e.add_argument("--strength", type=float, default=None,
                   help="how far --init-image is noised, in (0, 1]: 1 = pure noise (default 0.75; 1 with --mask)")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    opt = parser.parse_intermixed_args(argv)
    if bool(opt.run) == bool(opt.config):
        parser.error("give --run logs/<run>, or --config CONFIG.yaml --ckpt CHECKPOINT")
    if opt.config and not opt.ckpt:
        parser.error("--config needs --ckpt CHECKPOINT")
    check_sampling_options(parser, opt)
    if opt.seed < 0:
        parser.error(f"--seed must be >= 0, got {opt.seed}")
    if opt.strength is not None and not opt.init_image:
        parser.error("--strength needs --init-image (the picture to start from)")
    if opt.init_image:
        opt.strength = (1.0 if opt.masks else 0.75) if opt.strength is None else opt.strength
        if not 0 < opt.strength <= 1:
            parser.error(f"--strength must be in (0, 1] (1: start from pure noise), got {opt.strength}")
    bad = [o for o in opt.overrides if "=" not in o]
    if bad:
        parser.error(f"unrecognized arguments {bad}: config overrides are key.path=value words")
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    opt.outdir = opt.outdir or os.path.join(opt.run or "", "samples", stamp)
    return opt


def check_sampling_options(parser: argparse.ArgumentParser, opt: argparse.Namespace) -> None:
    """--eta / --schedule that the --sampler cannot take are usage errors; fills in their defaults."""
    if opt.eta is not None and opt.eta < 0:
        parser.error(f"--eta must be >= 0, got {opt.eta}")
    try:
        opt.eta = resolve_eta(opt.sampler, opt.eta)
    except ValueError:
        takes = ("ddim",) + STOCHASTIC_SIGMA_SAMPLERS
        parser.error(f"--eta: the {opt.sampler} sampler is deterministic; use --eta 0 or a sampler that takes "
                     f"noise ({', '.join(takes)})")
    if opt.sampler in DISCRETE_SAMPLERS and opt.schedule not in (None, "uniform"):
        parser.error(f"--schedule {opt.schedule}: the {opt.sampler} sampler walks the model's own timesteps; the "
                     f"sigma schedules are for {', '.join(SIGMA_SAMPLERS)}")
    opt.schedule = schedule_for(opt.sampler, opt.schedule)


def schedule_for(sampler: str, schedule: str | None) -> str:
    """The sigma schedule a sampler runs: the given one, else karras for sigma samplers (uniform otherwise)."""
    return schedule or ("uniform" if sampler in DISCRETE_SAMPLERS else "karras")


def sampler_kwargs(opt: Any) -> dict[str, Any]:
    """model.sample's sampler arguments from options with sampler, steps, eta (and schedule) attributes."""
    return {"sampler": opt.sampler, "steps": opt.steps, "eta": opt.eta,
            "sigma_schedule": schedule_for(opt.sampler, getattr(opt, "schedule", None))}


# ---- model ---------------------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """The model and where it came from."""
    model: nn.Module
    config: DictConfig        # the merged config (data section included, when the files have one)
    files: list[str]
    ckpt: str
    kind: str                 # its condition: a key of ldm.sampling_conditions.KINDS


def pick_device(name: str | None) -> torch.device:
    if name is None:
        mps = getattr(torch.backends, "mps", None)
        return torch.device("cuda" if torch.cuda.is_available()
                            else "mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise SamplingError(f"--device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SamplingError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SamplingError(f"--device {name}: MPS is not available here; use --device cpu")
    return device


def model_sources(opt: argparse.Namespace) -> tuple[list[str], str]:
    """(config files, checkpoint) of `--run DIR [--ckpt K]` or `--config C... --ckpt K`."""
    if not opt.run:
        return list(opt.config), opt.ckpt
    if not os.path.isdir(opt.run):
        raise SamplingError(f"--run {opt.run!r}: no such run directory")
    files = sorted(glob.glob(os.path.join(opt.run, "configs", "*-project.yaml")))
    if not files:
        raise SamplingError(f"--run {opt.run!r}: no configs/*-project.yaml in it (main.py writes them to each run)")
    ckpt = opt.ckpt or os.path.join(opt.run, "checkpoints", "last.ckpt")
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"checkpoint file {ckpt!r} does not exist"
                                + ("" if opt.ckpt else " (has the run saved one? pick another with --ckpt)"))
    return files, ckpt


def load_config(files: Sequence[str], overrides: Sequence[str]) -> DictConfig:
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
    try:
        return OmegaConf.merge(*[OmegaConf.load(path) for path in files], OmegaConf.from_dotlist(list(overrides)))
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot read or merge {', '.join(files)} with overrides {list(overrides)}: {err}") from err


def load(opt: argparse.Namespace) -> Loaded:
    """The model of --run / --config + --ckpt on --device, in eval mode, EMA weights unless --no-ema."""
    files, ckpt = model_sources(opt)
    config = load_config(files, opt.overrides)
    model = load_model(config, ckpt, use_ema=not opt.no_ema, device=pick_device(opt.device),
                       allow_pickle=opt.unsafe_pickle)
    return Loaded(model, config, files, ckpt, model_kind(model))


# ---- sampling ------------------------------------------------------------------------------------------------------
def batches(n_items: int, conditions: Sequence[Condition], n: int, batch_size: int) -> Iterator[list[int]]:
    """Runs of consecutive sample indices (condition i // n) of at most batch_size whose conditions stack
    (equal shapes; spatial conditions may differ in size)."""
    def shapes(i: int) -> dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in conditions[i // n].cond.items()}

    chunk: list[int] = []
    for i in range(n_items):
        if chunk and (len(chunk) == batch_size or shapes(i) != shapes(chunk[0])):
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


def step_generator(seed: int) -> torch.Generator:
    """The generator of a batch's sampler noise: a stream independent of the x_T seeds seed, seed + 1, ..."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))


@dataclass
class Edit:
    """img2img / blended inpainting inputs of --init-image, --strength, --mask (any model)."""
    image: torch.Tensor               # (1, 3, H, W) in [-1, 1]
    latent: torch.Tensor              # (1, C, h, w): model.encode(image)
    strength: float
    fill: torch.Tensor | None = None  # (1, 1, H, W), 1 = regenerate (the --mask picture)
    known: torch.Tensor | None = None  # (1, 1, h, w), 1 = keep, at the sampled size

    def sample_kwargs(self, batch: int) -> dict[str, Any]:
        out = {"init": self.latent.expand(batch, *self.latent.shape[1:]), "strength": self.strength}
        if self.known is not None:
            out["mask"] = self.known.expand(batch, *self.known.shape[1:])
        return out


def load_edit(opt: argparse.Namespace, model: nn.Module, conditions: Sequence[Condition]) -> Edit | None:
    """The --init-image (and --mask) of an img2img / inpainting run, encoded and checked against the model."""
    if not getattr(opt, "init_image", None):
        return None
    image = read_image(opt.init_image, "--init-image")
    with torch.no_grad():
        latent = model.encode(image)                                                   # (1, C, h, w)
    expected = tuple(model.sample_shape(1, conditions[0].cond)[1:])
    if tuple(latent.shape[1:]) != expected:
        raise SamplingError(f"--init-image {opt.init_image!r} ({image.shape[-1]}x{image.shape[-2]} px) encodes to "
                            f"{tuple(latent.shape[1:])}; the model samples {expected}: resize the picture to the "
                            f"model's image size")
    edit = Edit(image, latent, opt.strength)
    if opt.masks:
        if len(opt.masks) != 1:
            raise SamplingError(f"--mask: give one mask for --init-image, got {len(opt.masks)}")
        fill = read_mask(opt.masks[0])
        if fill.shape[-2:] != image.shape[-2:]:
            raise SamplingError(f"--mask {opt.masks[0]!r} is {fill.shape[-1]}x{fill.shape[-2]} px, --init-image "
                                f"{opt.init_image!r} {image.shape[-1]}x{image.shape[-2]} px")
        edit.fill, edit.known = fill, known_mask_at(1 - fill, tuple(latent.shape[-2:])).to(latent)
    return edit


def sample_batch(model: nn.Module, conditions: Sequence[Condition], seeds: Sequence[int],
                 opt: argparse.Namespace, edit: Edit | None = None) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] on the CPU, one per (condition, seed); inpainting keeps the known pixels."""
    cond = {k: torch.cat([c.cond[k] for c in conditions]) for k in conditions[0].cond}
    shape = model.sample_shape(1, conditions[0].cond)[1:]
    x_T = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    editing = edit.sample_kwargs(len(seeds)) if edit is not None else {}
    images = model.sample(cond, batch_size=len(seeds), guidance_scale=opt.scale, generator=step_generator(seeds[0]),
                          x_T=x_T.to(model.device), **sampler_kwargs(opt), **editing).float().cpu()  # (B, C, H, W)
    for i, c in enumerate(conditions):
        known = c.known if c.known is not None else (edit.image, edit.fill) if edit and edit.fill is not None else None
        if known is not None:
            image, mask = known                                                         # (1, 3, H, W), (1, 1, H, W)
            images[i] = image[0] * (1 - mask[0]) + images[i] * mask[0]
    return images


def sample_all(model: nn.Module, conditions: Sequence[Condition], opt: argparse.Namespace,
               edit: Edit | None = None) -> list[torch.Tensor]:
    """Per condition its opt.n samples (n, C, H, W); sample i is seeded with opt.seed + i."""
    if opt.sampler != "ddpm" and opt.steps > model.num_timesteps:
        raise SamplingError(f"--steps {opt.steps} exceeds the model's {model.num_timesteps} timesteps")
    total = len(conditions) * opt.n
    images: list[torch.Tensor | None] = [None] * total
    with tqdm(total=total, desc=f"sampling ({opt.sampler})", unit="image") as bar:
        for chunk in batches(total, conditions, opt.n, opt.batch_size):
            out = sample_batch(model, [conditions[i // opt.n] for i in chunk], [opt.seed + i for i in chunk], opt,
                               edit)
            for i, image in zip(chunk, out):
                images[i] = image
            bar.update(len(chunk))
    return [torch.stack(images[r * opt.n:(r + 1) * opt.n]) for r in range(len(conditions))]


# ---- outputs -------------------------------------------------------------------------------------------------------
def save_png(image: torch.Tensor, path: str) -> None:
    """(C, H, W) in [-1, 1] -> an 8-bit PNG (C = 1 grey, C = 3 RGB)."""
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)


def settings(opt: argparse.Namespace, loaded: Loaded) -> dict[str, Any]:
    edit = {"init_image": opt.init_image, "strength": opt.strength, "mask": (opt.masks or [None])[0]} \
        if opt.init_image else {}
    return {"sampler": opt.sampler, "steps": loaded.model.num_timesteps if opt.sampler == "ddpm" else opt.steps,
            "schedule": opt.schedule, "eta": opt.eta, "guidance_scale": opt.scale, **edit, "seed": opt.seed,
            "n": opt.n, "batch_size": opt.batch_size,
            "use_ema": not opt.no_ema, "config": loaded.files, "overrides": list(opt.overrides),
            "checkpoint": loaded.ckpt, "device": str(loaded.model.device),
            "seeds": "sample i starts from noise seeded with seed + i"}


def write_outputs(outdir: str, conditions: Sequence[Condition], samples: Sequence[torch.Tensor],
                  run_settings: dict[str, Any]) -> list[dict[str, Any]]:
    """<outdir>/<index>_<slug>.png per sample, grid.png (one row per condition; an unconditional batch as a
    square) and samples.json; returns the json's image entries."""
    os.makedirs(outdir, exist_ok=True)
    sampler = {k: run_settings[k] for k in ("sampler", "schedule", "steps", "eta", "guidance_scale")}
    entries = []
    for row, (condition, images) in enumerate(zip(conditions, samples)):
        for col, image in enumerate(images):
            index = row * len(images) + col
            name = f"{index:05d}_{condition.slug or 'sample'}.png"
            save_png(image, os.path.join(outdir, name))
            entries.append({"file": name, "condition": condition.info, "seed": run_settings["seed"] + index,
                            "row": row, "column": col, "sampler": sampler})
    n = len(samples[0])
    nrow = math.ceil(math.sqrt(n)) if len(conditions) == 1 and not conditions[0].info else n
    save_png(make_grid(torch.cat(list(samples)), nrow=nrow, padding=2, pad_value=1.0), os.path.join(outdir, "grid.png"))
    with open(os.path.join(outdir, "samples.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": run_settings, "images": entries}, f, indent=2)
    return entries

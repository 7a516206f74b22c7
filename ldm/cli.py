"""Command line of main.py: flags, run directories, config loading/merging and trainer-flag helpers.

Lightning-free on purpose: main.py turns what this module returns into Trainer arguments.
"""
import argparse
import contextlib
import dataclasses
import datetime
import difflib
import glob
import inspect
import os
import re
from typing import Any, Iterator, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm import cluster
from ldm.cluster import TIMESTAMP_ENV  # noqa: F401 - the run's timestamp, shared with DDP workers and SLURM jobs
from ldm.util import ConfigError, get_obj_from_str

TIMESTAMP_FORMAT = "%Y-%m-%dT%H-%M-%S"

# A trailing `key.path=value` word (a dotted identifier path, optionally indexed, then "=").
_OVERRIDE = re.compile(r"^[A-Za-z_][\w\-]*(\[\d+\])?(\.[\w\-]+(\[\d+\])?)*=")

# Trainer flags main.py accepts; each overrides `lightning.trainer.<flag>` of the configs.
TRAINER_FLAGS = ("accelerator", "devices", "num_nodes", "strategy", "precision", "max_steps", "max_epochs")


def is_override(word: str) -> bool:
    """Whether a command-line word is a trailing `key.path=value` override."""
    return bool(_OVERRIDE.match(word))


def str2bool(value: str | bool) -> bool:
    """argparse type for `--flag true|false|yes|no|1|0`."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")


def parse_devices(value: str | int | Sequence[int]) -> int | str | list[int]:
    """`--devices`: "auto", "2" -> 2, "-1" -> -1 (all), "0,1" / "0,1," -> [0, 1]."""
    if isinstance(value, (int, list, tuple)):
        return list(value) if isinstance(value, tuple) else value
    text = str(value).strip()
    if text == "auto":
        return text
    try:
        if "," in text:
            return [int(part) for part in text.split(",") if part.strip()]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto', a device count (2, -1 for all) or a list of ids (0,1), got {value!r}") from None


def parse_gpus(value: str | int | Sequence[int]) -> dict[str, Any]:
    """Lightning-1.x style `--gpus`: "0,1" / "0,1," -> gpu ids [0, 1]; "2" -> 2 GPUs; "-1" -> all; "0" -> CPU."""
    devices = parse_devices(value)
    if devices == "auto":
        return {"accelerator": "gpu", "devices": "auto"}
    if devices == 0 or devices == []:
        return {"accelerator": "cpu", "devices": "auto"}
    return {"accelerator": "gpu", "devices": devices}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="main.py",
        description="Train / test a model from CompVis-style configs. Trailing key.path=value words "
                    "are OmegaConf dotlist overrides applied after all --base files.")
    p.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[],
                   help="config files, merged left to right (later ones win)")
    p.add_argument("-t", "--train", type=str2bool, nargs="?", const=True, default=False,
                   help="train (fit); without it only the test section runs")
    p.add_argument("--no-test", type=str2bool, nargs="?", const=True, default=False,
                   help="do not test after training (testing runs only when data has a test section)")
    p.add_argument("-r", "--resume", default="", metavar="LOGDIR|CKPT",
                   help="resume from a logdir (its checkpoints/last.ckpt) or from a checkpoint inside one")
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="allow arbitrary (code-executing) unpickling of the -r checkpoint and of configs' ckpt_path "
                        "files that weights-only loading refuses: only for files you trust")
    p.add_argument("-n", "--name", default="", help="run name (default: stem of the first --base file)")
    p.add_argument("-f", "--postfix", default="", help="appended to the run directory name")
    p.add_argument("-l", "--logdir", default="logs", help="root folder of the run directories")
    p.add_argument("-p", "--project", default="", help="group runs under <logdir>/<project>/")
    p.add_argument("-s", "--seed", type=int, default=23, help="seed for torch, numpy, random and workers")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                   help="lr = accumulate_grad_batches * devices * num_nodes * batch_size * base_learning_rate")
    p.add_argument("--no-scale_lr", dest="scale_lr", action="store_false", help="lr = base_learning_rate")
    p.add_argument("-d", "--debug", type=str2bool, nargs="?", const=True, default=False,
                   help="put the run under <logdir>/debug_runs/ so it does not clutter the real runs")
    trainer = p.add_argument_group("trainer", "override lightning.trainer.* of the configs")
    trainer.add_argument("--accelerator", help="cpu, gpu, mps, auto, ...")
    trainer.add_argument("--devices", type=parse_devices, help="auto, a count (-1: all) or ids 0,1")
    trainer.add_argument("--gpus", type=parse_gpus,
                         help="Lightning 1.x style: '0,1' or '0,1,' (ids), '2' (count), '-1' (all)")
    trainer.add_argument("--num_nodes", type=int)
    trainer.add_argument("--strategy", help="auto, ddp, ddp_spawn, fsdp, ...")
    trainer.add_argument("--precision", help="32-true, 16-mixed, bf16-mixed, ...")
    trainer.add_argument("--max_steps", type=int)
    trainer.add_argument("--max_epochs", type=int)
    launch = p.add_argument_group("launch", "submit to SLURM, or run a sweep of runs (docs/cluster.md)")
    launch.add_argument("--slurm", metavar="KEY=VALUE,...",
                        help="submit through submitit instead of training here: partition=...,nodes=2,"
                             "gpus_per_node=8,time=4:00:00[,signal_delay_s=120,cpus_per_task=..,mem_gb=..,account=..,"
                             "qos=..,constraint=..,array_parallelism=..,cluster=local]")
    launch.add_argument("--sweep", metavar="sweep.yaml",
                        help="run every point of the sweep (grid, list, zip or random over dotlist keys and seeds), "
                             "each in its own logdir; finished runs are skipped on a re-run, failed ones retried")
    launch.add_argument("--jobs", type=int, help="with --sweep: runs at once as local processes (default 1)")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Flags -> Namespace with `.overrides` (the trailing key=value words). Unknown flags are errors."""
    parser = build_parser()
    # `--slurm partition=gpu,...` looks like an override: the word after --slurm is its value
    values = {i + 1 for i, a in enumerate(argv) if a == "--slurm"}
    flags = [a for i, a in enumerate(argv) if i in values or not is_override(a)]
    opt = parser.parse_args(flags)
    opt.overrides = [a for i, a in enumerate(argv) if i not in values and is_override(a)]
    if opt.name and opt.resume:
        parser.error("-n/--name cannot be combined with -r/--resume (a resumed run keeps its logdir name); "
                     "use -r alone, or -n with --base for a new run")
    if opt.gpus is not None and (opt.devices is not None or opt.accelerator is not None):
        parser.error("--gpus sets accelerator and devices; do not combine it with --devices/--accelerator")
    if opt.sweep and opt.resume:
        parser.error("--sweep starts new runs; a re-run of the same sweep command continues it (no -r)")
    if opt.jobs is not None and (not opt.sweep or opt.slurm or opt.jobs < 1):
        parser.error("--jobs N (N >= 1) is for --sweep on this machine; with --slurm use array_parallelism=N")
    return opt


LAUNCH_FLAGS = ("--slurm", "--sweep", "--jobs")


def child_argv(argv: Sequence[str], *extra: str) -> list[str]:
    """`argv` without --slurm/--sweep/--jobs (and their values), then `extra` (later flags win in argparse)."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in LAUNCH_FLAGS:
            skip = True
        elif not word.startswith(tuple(f"{flag}=" for flag in LAUNCH_FLAGS)):
            out.append(word)
    out += extra
    opt = parse_args(out)
    if opt.slurm or opt.sweep or opt.jobs:
        raise ConfigError(f"write {', '.join(LAUNCH_FLAGS)} in full (not abbreviated) so they can be left out of "
                          f"the runs they launch")
    return out


@dataclasses.dataclass
class RunPaths:
    """Where a run writes, and what it resumes from."""
    now: str                    # timestamp of this invocation (names the saved config files)
    logdir: str                 # <root>/<now>_<name><postfix> (or the resumed one)
    base: list[str]             # config files to merge: the resumed logdir's configs first
    resume_ckpt: str | None     # checkpoint to continue from

    @property
    def ckptdir(self) -> str:
        return os.path.join(self.logdir, "checkpoints")

    @property
    def cfgdir(self) -> str:
        return os.path.join(self.logdir, "configs")


@contextlib.contextmanager
def shared_timestamp() -> Iterator[str]:
    """The run's timestamp, exported while the run lasts: inherited from the launching process (Lightning's DDP
    workers, a submitit job), else agreed by the ranks of a torchrun job, else now."""
    inherited = os.environ.get(TIMESTAMP_ENV)
    now = datetime.datetime.now().strftime(TIMESTAMP_FORMAT)
    os.environ[TIMESTAMP_ENV] = inherited or cluster.shared_value("run_timestamp", now)
    try:
        yield os.environ[TIMESTAMP_ENV]
    finally:
        if inherited is None:
            os.environ.pop(TIMESTAMP_ENV, None)


def resolve_resume(path: str) -> tuple[str, str]:
    """`-r LOGDIR|CKPT` -> (logdir, checkpoint); a checkpoint's logdir is two levels up."""
    if os.path.isfile(path):
        return os.path.dirname(os.path.dirname(os.path.abspath(path))), path
    if os.path.isdir(path):
        ckpt = os.path.join(path.rstrip("/\\"), "checkpoints", "last.ckpt")
        if not os.path.isfile(ckpt):
            raise ConfigError(f"-r {path}: no checkpoint to resume from at {ckpt}")
        return path.rstrip("/\\"), ckpt
    raise ConfigError(f"-r {path}: no such logdir or checkpoint file")


def run_paths(opt: argparse.Namespace, now: str) -> RunPaths:
    """The run directory (new, or the resumed one) and the config files to load."""
    if opt.resume:
        logdir, ckpt = resolve_resume(opt.resume)
        saved = sorted(glob.glob(os.path.join(logdir, "configs", "*.yaml")))
        if not saved and not opt.base:
            raise ConfigError(f"-r {opt.resume}: {logdir}/configs has no saved *.yaml and no --base was given")
        return RunPaths(now, logdir, saved + list(opt.base), ckpt)
    if not opt.base:
        raise ConfigError("no config given: pass --base config.yaml [more.yaml ...] or -r LOGDIR")
    name = opt.name or os.path.splitext(os.path.basename(opt.base[0]))[0]
    root = os.path.join(opt.logdir, opt.project, "debug_runs" if opt.debug else "")
    logdir = os.path.join(root, f"{now}_{name}{opt.postfix}")
    # The same timestamp and name again: a requeued SLURM job, a restarted torchrun worker, a retried sweep run.
    last = os.path.join(logdir, "checkpoints", "last.ckpt")
    return RunPaths(now, logdir, list(opt.base), last if os.path.isfile(last) else None)


def load_config(files: Sequence[str], overrides: Sequence[str]) -> DictConfig:
    """Merge the YAML files left to right, then the dotlist overrides."""
    configs = []
    for path in files:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            configs.append(OmegaConf.load(path))
        except (yaml.YAMLError, OmegaConfBaseException) as err:
            raise ConfigError(f"cannot parse config file {path}: {err}") from err
    try:
        config = OmegaConf.merge(*configs, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot merge configs {', '.join(files)} with overrides {list(overrides)}: {err}") from err
    if not isinstance(config, DictConfig):
        raise ConfigError(f"configs {', '.join(files)} must be mappings with model/data/lightning sections")
    for section in ("model", "data"):
        if section not in config:
            raise ConfigError(f"the configs ({', '.join(files)}) have no '{section}' section")
    return config


def trainer_config(lightning_config: DictConfig | dict, opt: argparse.Namespace, launch: dict | None = None) -> dict:
    """`lightning.trainer` with the CLI trainer flags applied and Lightning-1.x settings translated.

    CompVis-era configs (and the lightning.yaml they saved) carry `gpus: 0,` and `accelerator: ddp`. `launch`
    (num_nodes and devices of a torchrun or SLURM launch) fills what neither the config nor a flag sets.
    """
    trainer = lightning_config.get("trainer") or {}
    config = dict(OmegaConf.to_container(trainer, resolve=True) if isinstance(trainer, DictConfig) else trainer)
    if config.get("accelerator") in ("ddp", "ddp_spawn"):
        config.setdefault("strategy", config.pop("accelerator"))
    if config.get("gpus") is not None:
        try:
            config.update(parse_gpus(config.pop("gpus")))
        except argparse.ArgumentTypeError as err:
            raise ConfigError(f"lightning.trainer.gpus: {err}") from None
    config.pop("gpus", None)
    flags = {name: getattr(opt, name) for name in TRAINER_FLAGS if getattr(opt, name) is not None}
    flags.update(opt.gpus or {})
    if isinstance(flags.get("precision"), str) and flags["precision"].isdigit():
        flags["precision"] = int(flags["precision"])
    return {**(launch or {}), **config, **flags}


def check_trainer_kwargs(kwargs: dict, trainer_cls: type) -> None:
    """ConfigError naming each `lightning.trainer` key that `trainer_cls` does not accept."""
    accepted = set(inspect.signature(trainer_cls.__init__).parameters) - {"self"}
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        hints = [f"lightning.trainer.{k}" + "".join(f" (did you mean {h!r}?)"
                                                   for h in difflib.get_close_matches(k, sorted(accepted), n=1))
                 for k in unknown]
        raise ConfigError(f"unknown Trainer argument(s): {'; '.join(hints)}")


def learning_rate(base_lr: float, batch_size: int, accumulate: int, n_devices: int, num_nodes: int,
                  scale: bool) -> tuple[float, str]:
    """The learning rate to set on the model and a line that explains it."""
    if not scale:
        return base_lr, f"Setting learning rate to {base_lr:.2e} (base_learning_rate, --scale_lr off)"
    lr = accumulate * n_devices * num_nodes * batch_size * base_lr
    return lr, (f"Setting learning rate to {lr:.2e} = {accumulate} (accumulate_grad_batches) * "
                f"{n_devices} (devices) * {num_nodes} (num_nodes) * {batch_size} (batch_size) * "
                f"{base_lr:.2e} (base_learning_rate)")


def merge_named(defaults: dict, overrides: DictConfig | dict | None) -> dict[str, dict]:
    """Merge `{name: {target, params}}` sections by name; a `name: null` entry removes a default."""
    merged = OmegaConf.merge(defaults, overrides or {})
    return {name: OmegaConf.to_container(cfg, resolve=True) for name, cfg in merged.items() if cfg is not None}


def logger_config(logdir: str, config: DictConfig | None, tensorboard: bool) -> dict:
    """`lightning.logger` ({target, params}) completed with the run's folder.

    The target defaults to TensorBoard (CSV without tensorboard). Every logger that takes a
    `save_dir` gets the logdir; TensorBoard and CSV write to `<logdir>/tensorboard` / `<logdir>/csv`.
    """
    config = OmegaConf.to_container(config, resolve=True) if config else {}
    target = config.get("target") or ("pytorch_lightning.loggers.TensorBoardLogger" if tensorboard
                                      else "pytorch_lightning.loggers.CSVLogger")
    cls = get_obj_from_str(target)
    defaults = {"save_dir": logdir} if "save_dir" in inspect.signature(cls).parameters else {}
    if cls.__name__ in ("TensorBoardLogger", "CSVLogger"):
        defaults.update(name="tensorboard" if cls.__name__ == "TensorBoardLogger" else "csv", version="")
    return {**config, "target": target, "params": {**defaults, **(config.get("params") or {})}}


def has_test_data(config: DictConfig) -> bool:
    return "test" in (config.data.get("params") or {})


# Callbacks every run gets; `lightning.callbacks.<name>` refines or (with null) removes one.
DEFAULT_CALLBACKS = {
    "image_logger": {"target": "ldm.callbacks.ImageLogger",
                     "params": {"batch_frequency": 750, "max_images": 4, "clamp": True}},
    "learning_rate_logger": {"target": "pytorch_lightning.callbacks.LearningRateMonitor",
                             "params": {"logging_interval": "step"}},
    "epoch_stats": {"target": "ldm.callbacks.EpochStats"},
}


def checkpoint_config(ckptdir: str, monitor: str | None, overrides: DictConfig | None) -> dict:
    """ModelCheckpoint: the top 3 by `monitor` (the latest one without a monitor); last.ckpt is LastCheckpoint's."""
    params = {"dirpath": ckptdir, "filename": "{epoch:06}-{step:09}", "verbose": True,
              "enable_version_counter": False}  # a resumed run overwrites, never writes last-v1.ckpt
    if monitor:
        params.update(monitor=monitor, save_top_k=3)
    merged = OmegaConf.merge({"target": "pytorch_lightning.callbacks.ModelCheckpoint", "params": params},
                             overrides or {})
    return OmegaConf.to_container(merged, resolve=True)

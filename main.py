"""Train or test a model from CompVis-style configs (`python main.py -h` lists the flags).

    python main.py --base configs/autoencoder/kl_f4_photos_tiny.yaml -t [key.path=value ...]
    python main.py -r logs/<run> -t lightning.trainer.max_steps=20000   # continue from its last.ckpt

A run writes `<logdir>/<now>_<name><postfix>/` (under `<logdir>/<project>/` with -p, under
`<logdir>/debug_runs/` with -d): `configs/` (merged project and lightning configs), `checkpoints/`,
`images/{train,val}/` and the logger's files. DDP workers that Lightning starts re-run this script
and inherit the launching process's timestamp ($LDM_RUN_TIMESTAMP), so every rank names the same
logdir; only global rank 0 writes to it (torchrun ranks agree on one timestamp, submitit jobs carry
theirs). Config mistakes (and a -r checkpoint of another architecture) exit with status 2 and one message; a run
stopped by NaN/inf losses or by a checkpoint that cannot be written, with 1.

    python main.py -b cfg.yaml -t --slurm partition=gpu,nodes=2,gpus_per_node=8,time=24:00:00   # submit
    python main.py -b cfg.yaml -t --sweep sweep.yaml [--jobs 2 | --slurm ...]                  # many runs
    python main.py -b cfg.yaml -t --devices 8 --strategy fsdp                                   # sharded U-Net
(docs/cluster.md).

Every checkpoint holds the training-data position and the RNG states (ldm.resume.TrainingState), so `-r`
continues bit for bit in deterministic mode (lightning.trainer.deterministic=true); last.ckpt is written at
epoch ends, validations and the end, and every N steps with lightning.callbacks.last_checkpoint.params.
every_n_train_steps=N.
"""
import argparse
import importlib.util
import os
import sys
from typing import Sequence

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_info

from ldm import cli, cluster, sweep
from ldm.checkpoint import (CheckpointMismatchError, CheckpointWriteError, UnsafeCheckpointError, compare_state_dict,
                            state_dict_shapes, unsafe_pickle_allowed)
# CompVis configs name `main.ImageLogger`, `main.DataModuleFromConfig`, ...: keep those targets valid.
from ldm.callbacks import AtomicCheckpointIO, ImageLogger, LastCheckpoint, SetupCallback  # noqa: F401
from ldm.data.datamodule import DataModuleFromConfig  # noqa: F401
from ldm.models import sharding
from ldm.models.nonfinite import NonFiniteLossError
from ldm.util import ConfigError, instantiate_from_config


MAIN_DIR = os.path.dirname(os.path.abspath(__file__))


def main(argv: Sequence[str] | None = None, preempt_signal: int | None = None) -> int:
    """Exit status: 0, 2 (bad config or flags), cluster.EXIT_PREEMPTED (stopped by `preempt_signal` after saving)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    opt = cli.parse_args(argv)
    with cli.shared_timestamp() as now:
        files = opt.base
        try:
            if opt.sweep:
                return sweep.launch(opt, argv, now, MAIN_DIR)
            paths = cli.run_paths(opt, now)
            files = paths.base
            if opt.slurm:
                return cluster.submit(opt.slurm, cli.child_argv(argv), paths.logdir, now, MAIN_DIR)
            with unsafe_pickle_allowed(opt.unsafe_pickle):
                return run(opt, paths, preempt_signal)
        except (UnsafeCheckpointError, CheckpointMismatchError) as err:
            print(f"main.py: error: {err}", file=sys.stderr)
            return 2
        except (NonFiniteLossError, CheckpointWriteError) as err:
            print(f"main.py: error: {err}", file=sys.stderr)
            return 1
        except ConfigError as err:
            print(f"main.py: config error: {err}\n  config files: {', '.join(files) or 'none'}"
                  f"; overrides: {' '.join(opt.overrides) or 'none'}", file=sys.stderr)
            return 2


def run(opt: argparse.Namespace, paths: cli.RunPaths, preempt_signal: int | None = None) -> int:
    """Load the configs, build model, data and trainer, then fit and/or test."""
    config = cli.load_config(paths.base, opt.overrides)
    lightning_config = config.pop("lightning", None) or OmegaConf.create()
    launch = cluster.trainer_defaults(os.environ, TorchElasticEnvironment.detect(), SLURMEnvironment.detect())
    lightning_config.trainer = cli.trainer_config(lightning_config, opt, launch)
    test = cli.has_test_data(config) and not opt.no_test
    if not opt.train and not test:
        raise ConfigError("nothing to run: pass -t/--train, or give the data config a 'test' section")
    pl.seed_everything(opt.seed, workers=True)
    model = instantiate_from_config(config.model, where="model")
    data = instantiate_from_config(config.data, where="data")
    if paths.resume_ckpt:
        check_resume_fits(model, paths.resume_ckpt, opt.unsafe_pickle)
    trainer = make_trainer(config, lightning_config, paths, model, preempt_signal)
    if opt.train:
        if paths.resume_ckpt and not opt.resume:
            rank_zero_info(f"{paths.logdir} exists: continuing from {paths.resume_ckpt}")
        model.learning_rate = learning_rate(config, trainer, opt.scale_lr)
        trainer.fit(model, data, ckpt_path=paths.resume_ckpt, weights_only=not opt.unsafe_pickle)
        if any(getattr(cb, "stopped_by_signal", False) for cb in trainer.callbacks):
            return cluster.EXIT_PREEMPTED
    if test and not trainer.interrupted:
        trainer.test(model, data, ckpt_path=None if opt.train else paths.resume_ckpt,
                     weights_only=not opt.unsafe_pickle)
    return 0


def make_trainer(config: DictConfig, lightning_config: DictConfig, paths: cli.RunPaths,
                 model: pl.LightningModule, preempt_signal: int | None = None) -> pl.Trainer:
    """Trainer from `lightning.trainer` plus the run's logger, callbacks and atomic checkpoint IO.

    `preempt_signal` (a submitit job's): last.ckpt is saved at the end of the batch it arrives in and training
    stops; Lightning's own SLURM requeue (a save inside the signal handler, mid-step) stays off.
    """
    kwargs = OmegaConf.to_container(lightning_config.trainer, resolve=True)
    cli.check_trainer_kwargs(kwargs, pl.Trainer)
    if kwargs.get("strategy") == "fsdp":
        kwargs["strategy"] = sharding.fully_sharded_strategy(model)
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    logger = cli.logger_config(paths.logdir, lightning_config.get("logger"), tensorboard)
    callbacks = [SetupCallback(paths.now, paths.logdir, paths.ckptdir, paths.cfgdir,
                               OmegaConf.to_container(config, resolve=True),
                               OmegaConf.to_container(lightning_config, resolve=True))]
    last = {"ckpt_path": os.path.join(paths.ckptdir, "last.ckpt"), "periodic": kwargs.get("enable_checkpointing", True)}
    if preempt_signal:
        last.update(signum=int(preempt_signal), stop_on_signal=True)
    # training_state first: its end-of-batch snapshot must precede any checkpoint written at that batch
    run_callbacks = {"training_state": {"target": "ldm.resume.TrainingState"},
                     "last_checkpoint": {"target": "ldm.callbacks.LastCheckpoint", "params": last}}
    named = cli.merge_named({**run_callbacks, **cli.DEFAULT_CALLBACKS}, lightning_config.get("callbacks"))
    callbacks += [instantiate_from_config(cfg, where=f"lightning.callbacks.{name}") for name, cfg in named.items()]
    if kwargs.get("enable_checkpointing", True):
        checkpoint = cli.checkpoint_config(paths.ckptdir, getattr(model, "monitor", None),
                                           lightning_config.get("modelcheckpoint"))
        callbacks.append(instantiate_from_config(checkpoint, where="lightning.modelcheckpoint"))
    plugins = kwargs.get("plugins") or []
    plugins = [AtomicCheckpointIO(), *(plugins if isinstance(plugins, list) else [plugins])]
    if preempt_signal and SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return pl.Trainer(**{**kwargs,
                         "default_root_dir": paths.logdir,
                         "logger": instantiate_from_config(logger, where="lightning.logger"),
                         "callbacks": callbacks,
                         "plugins": plugins})


def check_resume_fits(model: pl.LightningModule, ckpt: str, allow_pickle: bool) -> None:
    """A CheckpointMismatchError naming the file and the keys / shapes when the -r checkpoint holds another
    architecture than the config builds (read memory-mapped, before Lightning loads it)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    report = compare_state_dict(expected, state_dict_shapes(ckpt, allow_pickle=allow_pickle))
    if not report.ok:
        raise CheckpointMismatchError(report.describe(ckpt, type(model).__name__) + "\n  -r continues a run with "
                                      "the configs saved in its logdir: overrides or --base files that change the "
                                      "architecture cannot continue this checkpoint", report)


def learning_rate(config: DictConfig, trainer: pl.Trainer, scale: bool) -> float:
    """base_learning_rate, scaled by the effective batch size when `scale` (the rule is printed)."""
    base_lr, batch_size = config.model.get("base_learning_rate"), config.data.get("params", {}).get("batch_size")
    if base_lr is None or batch_size is None:
        raise ConfigError("training needs model.base_learning_rate and data.params.batch_size")
    lr, rule = cli.learning_rate(base_lr, batch_size, trainer.accumulate_grad_batches, trainer.num_devices,
                                 trainer.num_nodes, scale)
    rank_zero_info(rule)
    return lr


if __name__ == "__main__":
    sys.exit(main())

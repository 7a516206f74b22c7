"""DataModuleFromConfig: the `data:` section of a CompVis-style config as a LightningDataModule."""
from typing import Any, Callable, Mapping

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from ldm.data.sampler import ResumableSampler
from ldm.util import ConfigError, default, instantiate_from_config

SECTIONS = ("train", "validation", "test")
STAGE_SECTIONS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",), "predict": ()}


class DataModuleFromConfig(pl.LightningDataModule):
    """Builds the train/validation/test datasets from `{target, params}` sections.

    Datasets are built in `setup()`, so every DDP rank builds its own. Only the dataloader
    methods of the sections given exist (no `validation` section -> Lightning runs no
    validation loop). `wrap` is accepted for CompVis configs and ignored: DataLoader already
    takes any object with `__getitem__` and `__len__`, which is all CompVis' wrapper added.
    `drop_last` applies to the training loader only, so evaluation sees every sample.

    Training order: a `ResumableSampler` (epoch-seeded shuffle, this rank's share, augmentation seeds carried
    by the indices) for map-style datasets; a dataset with `set_loader` / `set_position` (`ImageShards`) is
    told the batch size, workers and rank instead. `set_train_position(epoch, batches)` (called by
    `ldm.resume.TrainingState` when a checkpoint is restored) makes the loader continue that epoch after its
    first `batches` batches. Every loader has its own generator, so creating one takes nothing from torch's
    global RNG. `seed` defaults to torch's initial seed when the module is built (main.py's --seed).
    """

    def __init__(self,
                 batch_size: int,
                 train: Mapping | None = None,          # {target, params} of the training dataset
                 validation: Mapping | None = None,
                 test: Mapping | None = None,
                 num_workers: int = 0,                  # > 0: persistent worker processes
                 shuffle_val: bool = False,
                 pin_memory: bool | None = None,        # default: torch.cuda.is_available()
                 drop_last: bool = False,
                 wrap: bool = False,                    # CompVis compatibility, no effect
                 seed: int | None = None):              # training order and augmentation (default: global seed)
        super().__init__()
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"data.params.batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"data.params.num_workers must be a non-negative integer, got {num_workers!r}")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_val, self.drop_last, self.wrap = shuffle_val, drop_last, wrap
        self.pin_memory = default(pin_memory, torch.cuda.is_available())
        self.seed = int(torch.initial_seed()) if seed is None else int(seed)
        self._train_position: tuple[int, int] | None = None  # (epoch, batches done) of a restored checkpoint
        given = {"train": train, "validation": validation, "test": test}
        self.dataset_configs = {name: cfg for name, cfg in given.items() if cfg is not None}
        if not self.dataset_configs:
            raise ConfigError("data.params needs at least one of 'train', 'validation', 'test'")
        self.datasets: dict[str, Any] = {}
        hooks = {"train": ("train_dataloader", self._train_dataloader),
                 "validation": ("val_dataloader", self._val_dataloader),
                 "test": ("test_dataloader", self._test_dataloader)}
        for name in self.dataset_configs:
            attr, method = hooks[name]
            setattr(self, attr, method)  # Lightning treats a section's loader as present only when set

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs (all given sections when `stage` is None)."""
        for name in STAGE_SECTIONS.get(stage, SECTIONS):
            if name in self.dataset_configs:
                self.dataset(name)

    def dataset(self, name: str) -> Any:
        """The dataset of section `name`, built on first use."""
        if name not in self.dataset_configs:
            raise ConfigError(f"data.params has no '{name}' section (given: {', '.join(self.dataset_configs)})")
        if name not in self.datasets:
            self.datasets[name] = instantiate_from_config(self.dataset_configs[name], where=f"data.params.{name}")
        return self.datasets[name]

    def set_train_position(self, epoch: int, batches: int) -> None:
        """Resume: the training loader built next continues epoch `epoch` after its first `batches` batches."""
        self._train_position = (int(epoch), int(batches))

    def _distribution(self) -> tuple[int, int, int]:
        """(world size, global rank, current epoch) of the attached trainer; (1, 0, 0) without one."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0, 0
        return trainer.world_size, trainer.global_rank, trainer.current_epoch

    def _epoch(self) -> int:
        return self._distribution()[2]

    def _loader(self, dataset: Any, drop_last: bool, loader: type[DataLoader] = DataLoader,
                **kwargs: Any) -> DataLoader:
        return loader(dataset,
                      batch_size=self.batch_size,
                      num_workers=self.num_workers,
                      pin_memory=self.pin_memory,
                      drop_last=drop_last,
                      persistent_workers=self.num_workers > 0,
                      generator=torch.Generator().manual_seed(self.seed),
                      **kwargs)

    def _train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        world, rank, epoch = self._distribution()
        if callable(getattr(dataset, "begin_epoch", None)):            # ImageShards: split and resumed inside
            dataset.set_loader(self.batch_size, self.num_workers, world, rank)
            dataset.set_position(*(self._train_position or (epoch, 0)))
            self._train_position = None
            return self._loader(dataset, self.drop_last, loader=EpochLoader, epoch_fn=self._epoch)
        if isinstance(dataset, IterableDataset):
            return self._loader(dataset, self.drop_last)
        sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        per_epoch = len(sampler) // self.batch_size if self.drop_last else -(-len(sampler) // self.batch_size)
        epoch, batches = self._start(epoch, per_epoch)
        sampler.set_epoch(epoch)
        sampler.resume(epoch, batches * self.batch_size)
        return self._loader(dataset, self.drop_last, sampler=sampler)

    def _start(self, epoch: int, per_epoch: int) -> tuple[int, int]:
        """(epoch, batches to skip) of the next pass: the restored position when it is in the trainer's current
        epoch (the next epoch's start when it ended that epoch), else the start of the current epoch."""
        resume_epoch, batches = self._train_position or (epoch, 0)
        self._train_position = None
        if resume_epoch != epoch:
            return epoch, 0
        return (epoch + 1, 0) if batches >= per_epoch else (epoch, batches)

    def _eval_loader(self, name: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(name)
        if callable(getattr(dataset, "set_loader", None)):
            world, rank, _ = self._distribution()
            dataset.set_loader(self.batch_size, self.num_workers, world, rank)
        return self._loader(dataset, False, shuffle=shuffle and not isinstance(dataset, IterableDataset))

    def _val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation", self.shuffle_val)

    def _test_dataloader(self) -> DataLoader:
        return self._eval_loader("test", False)


class EpochLoader(DataLoader):
    """A DataLoader that calls `dataset.begin_epoch(epoch_fn())` before every pass: an iterable dataset has no
    sampler for Lightning's set_epoch, and this reaches it whether it is re-iterated or not."""

    def __init__(self, dataset: Any, *args: Any, epoch_fn: Callable[[], int], **kwargs: Any):
        super().__init__(dataset, *args, **kwargs)
        self.epoch_fn = epoch_fn

    def __iter__(self):
        self.dataset.begin_epoch(self.epoch_fn())
        return super().__iter__()

"""ImageShards: WebDataset tar shards (written by scripts/make_shards.py) as a stream of training samples.

A shard folder holds `shard-000000.tar`, ... and `index.json` (shard files, their sample counts, class names).
Each sample is `<key>.<jpg|png|...>` (the picture's bytes) and `<key>.json` ({"class_label", "caption",
"boxes", "file_name"}). Samples come out in the ImageFolder batch format (docs/ARCHITECTURE.md), through the
same resize / crop / flip (`ImageView`).

Reading is split by node and by worker: in each epoch the shards are shuffled (seed, epoch) and dealt to the
num_replicas x num_workers readers ("slots"); a slot reads its shards in turn through a shuffle buffer. In
training every slot yields the same number of whole batches per epoch, reading its shards again when they hold
fewer samples than that (each pass through its own shuffle buffer), so the DataLoader's round-robin over
workers is exact, and a run resumed after `b` batches of an epoch skips exactly the samples those batches
held (read, not decoded). Every random choice (shard order, shuffle buffer, crops) is a function of (seed,
epoch, slot, position): no global RNG.
"""
import io
import itertools
import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ldm.data.image_folder import IMAGE_EXTENSIONS, ImageView, check_view

INDEX_FILE = "index.json"
INDEX_FORMAT = "ldm-image-shards"
IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def read_index(root: str | Path) -> dict[str, Any]:
    """`root/index.json` (or the file itself), checked: every shard listed exists; errors name the file."""
    path = Path(root).expanduser()
    path = path / INDEX_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"ImageShards: no shard index at {str(path)!r} (write shards with "
                                f"scripts/make_shards.py --root <image folder> --out <shard folder>)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"ImageShards: {str(path)!r} is not valid JSON ({err})") from err
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not index.get("shards"):
        raise ValueError(f"ImageShards: {str(path)!r} is not a shard index of scripts/make_shards.py "
                         f"(expected format {INDEX_FORMAT!r} and a non-empty 'shards' list)")
    for shard in index["shards"]:
        shard["path"] = str(path.parent / shard["file"])
        if not Path(shard["path"]).is_file():
            raise FileNotFoundError(f"ImageShards: shard {shard['path']!r} listed in {str(path)!r} does not exist")
    return index


def shuffled(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A shuffle buffer of `size` items (WebDataset's shuffle, with an explicit generator)."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


def tar_samples(paths: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Raw samples ({"__key__", "__url__", extension: bytes}) of tar shards, read in order."""
    import webdataset as wds  # lazy: only shard reading needs it

    for path in paths:
        yield from wds.tariterators.tarfile_samples([{"url": path}])


class ImageShards(IterableDataset):
    """Tar shards of scripts/make_shards.py -> {image, class_label, caption[, objects]} (ImageFolder's format).

    `training`: shuffled shards and samples, fixed-length epochs of whole batches, resumable (see the module
    docstring); the DataModule calls `set_loader` and `set_position`, and its loader calls `begin_epoch`
    before every pass (without that, every pass reads epoch 0). Otherwise (validation, test) every sample
    once, in shard order, each slot reading its own shards; no length is reported (the loop runs to the end).
    """

    def __init__(self,
                 root: str | Path,                      # folder with index.json (or the index file)
                 size: int = 256,                       # output side in pixels
                 crop: str = "random",                  # "random" | "center"
                 flip: bool = True,                     # random horizontal mirror
                 resize: bool = True,                   # shorter side -> size before cropping
                 captions: bool = True,
                 class_labels: bool = True,
                 max_objects: int = 30,                 # rows of `objects` (padding class -1)
                 seed: int = 0,                         # shard order, shuffle buffer, crops
                 training: bool = True,
                 shuffle_buffer: int = 1000):           # samples held for shuffling (training)
        check_view("ImageShards", size, crop)
        if shuffle_buffer < 1:
            raise ValueError(f"ImageShards: shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.index = read_index(root)
        self.root = str(root)
        self.view = ImageView(size, crop, flip, resize)
        self.captions, self.class_labels, self.max_objects = captions, class_labels, max_objects
        self.has_boxes = bool(self.index.get("has_boxes"))
        self.classes = list(self.index.get("classes", []))
        self.seed, self.training, self.shuffle_buffer = seed, training, shuffle_buffer
        self.num_samples = sum(int(s["samples"]) for s in self.index["shards"])
        self._pass = torch.zeros(2, dtype=torch.int64).share_memory_()  # (epoch, batches to skip) of this pass
        self.set_loader(batch_size=1, num_workers=0)
        self.set_position(0, 0)

    # ---- the loader's shape and the resume position (set by DataModuleFromConfig) --------------------------
    def set_loader(self, batch_size: int, num_workers: int, num_replicas: int = 1, rank: int = 0) -> None:
        """The DataLoader's batch size and workers and this process' rank: they fix every slot's share."""
        slots = num_replicas * max(num_workers, 1)
        if len(self.index["shards"]) < slots:
            raise ValueError(f"ImageShards {self.root!r}: {len(self.index['shards'])} shard(s) cannot feed "
                             f"{num_replicas} rank(s) x {max(num_workers, 1)} worker(s) = {slots} readers; write "
                             f"smaller shards (make_shards.py --shard-size) or use fewer workers")
        per_worker = self.num_samples // (slots * batch_size)
        if self.training and per_worker == 0:
            raise ValueError(f"ImageShards {self.root!r}: {self.num_samples} samples do not fill one batch of "
                             f"{batch_size} for each of the {slots} readers")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.num_replicas, self.rank = num_replicas, rank
        self.batches_per_worker = per_worker

    def set_position(self, epoch: int, batches: int) -> None:
        """Resume: the passes over epoch `epoch` skip its first `batches` batches on this rank (a restored
        checkpoint's position); a position at the end of an epoch makes that epoch's pass read the next one."""
        self._resume = (epoch, batches)
        self.begin_epoch(epoch)

    def begin_epoch(self, epoch: int) -> None:
        """Called in the main process before every pass (DataModuleFromConfig's loader does it with the trainer's
        epoch): the pass reads `epoch`, less what `set_position` says was already trained. The workers read
        it from shared memory, so it reaches them whether they persist or not."""
        resume_epoch, batches = self._resume
        skip = 0
        if epoch == resume_epoch and batches >= max(self.num_workers, 1) * self.batches_per_worker:
            epoch += 1
        elif epoch == resume_epoch:
            skip = batches
        self._pass[0], self._pass[1] = epoch, skip

    def __len__(self) -> int:
        """Samples per epoch on this rank (training); evaluation streams have no fixed length."""
        if not self.training:
            raise TypeError("ImageShards(training=False) streams every sample once and has no fixed length")
        return max(self.num_workers, 1) * self.batches_per_worker * self.batch_size

    # ---- iteration ------------------------------------------------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != max(self.num_workers, 1):
            raise RuntimeError(f"ImageShards was set up for {self.num_workers} DataLoader worker(s) (set_loader) "
                               f"but runs in {workers}; build its loader with DataModuleFromConfig")
        return worker, workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = self._worker()
        epoch, skip_batches = (int(v) for v in self._pass)
        # the loader's round-robin restarts at worker 0: it takes over the reader whose batch was due next
        worker = (worker + skip_batches) % workers
        slot, slots = self.rank * workers + worker, self.num_replicas * workers
        shards = [self.index["shards"][k]["path"] for k in self._shard_order(epoch)[slot::slots]]
        if not self.training:
            yield from self._decoded(tar_samples(shards), epoch, slot, 0)
            return
        rng = np.random.default_rng([self.seed, epoch, slot])
        passes = (shuffled(tar_samples(shards), self.shuffle_buffer, rng) for _ in itertools.count())
        stream = itertools.chain.from_iterable(passes)   # a second pass only if the slot's shards run short
        quota = self.batches_per_worker * self.batch_size
        done = self._skip_count(skip_batches, worker, workers) * self.batch_size
        raw = itertools.islice(stream, done, quota)                # skipped samples are read, not decoded
        yield from self._decoded(raw, epoch, slot, done)

    def _shard_order(self, epoch: int) -> np.ndarray:
        n = len(self.index["shards"])
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.training else np.arange(n)

    @staticmethod
    def _skip_count(batches: int, worker: int, workers: int) -> int:
        """Batches of `worker` among the first `batches` of a round-robin over `workers` (j % workers == worker)."""
        return max(0, math.ceil((batches - worker) / workers))

    def _decoded(self, raw: Iterable[dict[str, Any]], epoch: int, slot: int, start: int) -> Iterator[dict]:
        raw = iter(raw)
        for position, item in enumerate(raw, start=start):
            while True:
                try:
                    yield self._sample(item, np.random.default_rng([self.seed, epoch, slot, position]))
                    break
                except (OSError, ValueError, KeyError, SyntaxError, Image.DecompressionBombError) as err:
                    warnings.warn(f"ImageShards: skipping unreadable sample {item.get('__key__')!r} of "
                                  f"{item.get('__url__')} ({type(err).__name__}: {err})", stacklevel=2)
                    item = next(raw, None)  # the next sample takes its place: the epoch keeps its length
                    if item is None:
                        return

    def _sample(self, item: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        key = next((k for k in IMAGE_KEYS if k in item), None)
        if key is None:
            raise KeyError(f"no image entry ({', '.join(IMAGE_KEYS)}) among {sorted(k for k in item if k[0] != '_')}")
        meta = json.loads(item["json"]) if "json" in item else {}
        with Image.open(io.BytesIO(item[key])) as img:
            img = self.view.open(img)
        boxes = np.asarray(meta.get("boxes", []), np.float32).reshape(-1, 5) if self.has_boxes else None
        return self.view.sample(img, rng, int(meta.get("class_label", 0)) if self.class_labels else 0,
                                str(meta.get("caption", "")) if self.captions else "", boxes, self.max_objects)


"""Training-loader throughput: an image folder (ImageFolder) beside its WebDataset shards (ImageShards).

    python bench/shards.py [--images 1000] [--side 512] [--size 256] [--batch 32] [--workers 0 2] [--dir DIR]

Writes --images JPEGs (quality 90, --side x 3/4 --side, random crops of the photographs bundled with
scikit-image, in 4 class folders with sidecar captions), shards them with scripts/make_shards.py's writer
(as-is, and re-encoded with the shorter side at --size), then times full training epochs of each through
DataModuleFromConfig (random --size crops, flips, batches of --batch) for each worker count: one epoch to
warm the page cache and start the workers, then --epochs timed epochs. Prints images/s and the load average.
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.photos import TRAIN_PHOTOS, load_photo
from ldm.data.shard_writer import write_shards


def make_folder(root: Path, n: int, side: int) -> None:
    """`n` JPEGs of side x 3/4 side cut from the bundled photographs, 4 class folders, sidecar captions."""
    rng = np.random.default_rng(0)
    photos = [load_photo(name) for name in TRAIN_PHOTOS]
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        scale = rng.uniform(0.5, 1.0) * min(w / side, h / (side * 3 // 4))
        cw, ch = int(side * scale), int(side * 3 // 4 * scale)
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.resize((side, side * 3 // 4), box=(left, top, left + cw, top + ch))
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{i:05d}.jpg", quality=90)
        (folder / f"{i:05d}.txt").write_text(f"picture {i} of {TRAIN_PHOTOS[i % len(photos)]}")


def throughput(train: dict, batch: int, workers: int, epochs: int) -> float:
    """Images per second over `epochs` epochs after a warm-up epoch."""
    dm = DataModuleFromConfig(batch_size=batch, num_workers=workers, seed=0, pin_memory=False, train=train)
    dm.setup("fit")
    loader = dm.train_dataloader()
    count = sum(len(b["caption"]) for b in loader)               # warm-up: page cache, worker start
    start = time.perf_counter()
    for _ in range(epochs):
        count = sum(len(b["caption"]) for b in loader)
    return epochs * count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--side", type=int, default=512, help="width of the written JPEGs (height 3/4 of it)")
    parser.add_argument("--size", type=int, default=256, help="training crop side")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--dir", default=None, help="working folder (default: a temporary one)")
    opt = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(opt.dir or tempfile.mkdtemp(prefix="bench_shards_"))
    folder = work / "images"
    if not folder.exists():
        make_folder(folder, opt.images, opt.side)
    quiet = lambda _: None  # noqa: E731
    timings = {}
    for name, resize in (("shards", None), (f"shards_{opt.size}", opt.size)):
        if not (work / name / "index.json").exists():
            start = time.perf_counter()
            write_shards(folder, work / name, shard_size=opt.shard_size, resize=resize, progress=quiet)
            timings[name] = time.perf_counter() - start
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20  # noqa: E731
    print(f"{opt.images} JPEGs {opt.side}x{opt.side * 3 // 4} in {folder} ({size(folder):.0f} MiB); shards "
          f"{size(work / 'shards'):.0f} MiB, pre-resized {size(work / f'shards_{opt.size}'):.0f} MiB; writing: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    print(f"cpus {os.cpu_count()}, load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    sources = {"ImageFolder": {"target": "ldm.data.image_folder.ImageFolder",
                               "params": {"root": str(folder), "size": opt.size}},
               "ImageShards": {"target": "ldm.data.shards.ImageShards",
                               "params": {"root": str(work / "shards"), "size": opt.size}},
               f"ImageShards, pre-resized to {opt.size}": {"target": "ldm.data.shards.ImageShards",
                                                            "params": {"root": str(work / f"shards_{opt.size}"),
                                                                       "size": opt.size}}}
    print(f"| loader | {' | '.join(f'{w} workers' for w in opt.workers)} |")
    print(f"|---|{'---|' * len(opt.workers)}")
    for name, train in sources.items():
        rates = [throughput(train, opt.batch, w, opt.epochs) for w in opt.workers]
        print(f"| {name} | {' | '.join(f'{r:.0f} img/s' for r in rates)} |", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

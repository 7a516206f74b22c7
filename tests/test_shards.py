"""Sharded data (make_shards.py, ImageShards), the resumable sampler and seeded augmentation."""
import importlib.util
import json
import pickle
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.image_folder import ImageFolder
from ldm.data.photos import Photos
from ldm.data.sampler import ResumableSampler, SeededIndex
from ldm.data.shard_writer import write_shards
from ldm.data.shards import ImageShards
from ldm.rng import preserved_rng, rng_state, same_rng_state, set_rng_state

REPO = Path(__file__).resolve().parents[1]


def make_folder(root: Path, n: int = 24, boxes: bool = True) -> Path:
    """`n` random 12x10 PNGs in two class folders, captions and boxes in metadata.jsonl."""
    rng = np.random.default_rng(0)
    meta = []
    for i in range(n):
        name = f"{'cats' if i % 2 else 'dogs'}/{i:02d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / name)
        meta.append({"file_name": name, "text": f"picture {i}"}
                    | ({"boxes": [[i % 3, 0.1, 0.2, 0.6, 0.9]]} if boxes else {}))
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    return root


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_shards(make_folder(root / "images"), root / "shards", shard_size=4, progress=lambda _: None)
    return root / "shards"


def key(sample: dict) -> str:
    return sample["caption"]


# ---------------------------------------------------------------- make_shards.py

def test_shards_hold_every_picture_with_its_label_caption_and_boxes(shard_dir):
    index = json.loads((shard_dir / "index.json").read_text())
    assert index["samples"] == 24 and [s["samples"] for s in index["shards"]] == [4] * 6
    assert index["classes"] == ["cats", "dogs"] and index["has_boxes"] and not index["skipped"]
    members = []
    for shard in index["shards"]:
        with tarfile.open(shard_dir / shard["file"]) as tar:
            members += tar.getnames()
    assert len(members) == 48 and sorted(m.split(".")[1] for m in members) == ["json"] * 24 + ["png"] * 24
    with tarfile.open(shard_dir / index["shards"][0]["file"]) as tar:
        meta = json.loads(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".json"))).read())
    i = int(meta["file_name"].split("/")[1][:2])
    assert meta["caption"] == f"picture {i}" and meta["class_name"] == ("cats" if i % 2 else "dogs")
    assert meta["class_label"] == index["classes"].index(meta["class_name"])
    assert meta["boxes"] == [[i % 3, pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.6), pytest.approx(0.9)]]
    every = ImageShards(shard_dir, size=8, training=False)
    assert sorted(key(s) for s in every) == sorted(f"picture {i}" for i in range(24))  # each exactly once


def test_make_shards_script_reports_bad_input_and_writes_reproducible_shards(tmp_path, shard_dir, capsys):
    spec = importlib.util.spec_from_file_location("make_shards", REPO / "scripts" / "make_shards.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    images = shard_dir.parent / "images"
    assert script.main(["--root", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert f"root {str(tmp_path / 'nope')!r} does not exist" in capsys.readouterr().err
    assert script.main(["--root", str(images), "--out", str(shard_dir), "--shard-size", "4"]) == 2
    assert "already holds shards" in capsys.readouterr().err
    assert script.main(["--root", str(images), "--out", str(tmp_path / "copy"), "--shard-size", "4"]) == 0
    assert (tmp_path / "copy" / "shard-000003.tar").read_bytes() == (shard_dir / "shard-000003.tar").read_bytes()


def test_unreadable_picture_is_skipped_and_listed(tmp_path):
    root = make_folder(tmp_path / "images", n=3, boxes=False)
    (root / "cats" / "01.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipping unreadable image .*01.png"):
        index = write_shards(root, tmp_path / "shards", progress=lambda _: None)
    assert index["samples"] == 2 and index["skipped"] == [str(root / "cats" / "01.png")]


# ---------------------------------------------------------------- ImageShards

def test_shard_batches_have_the_image_folder_format(shard_dir):
    folder = ImageFolder(shard_dir.parent / "images", size=8, max_objects=5)
    shards = ImageShards(shard_dir, size=8, max_objects=5)
    a, b = next(iter(DataLoader(folder, batch_size=4))), next(iter(DataLoader(shards, batch_size=4)))
    assert a.keys() == b.keys() == {"image", "class_label", "caption", "objects"}
    for k in ("image", "class_label", "objects"):
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
    assert b["image"].min() >= -1 and b["image"].max() <= 1 and isinstance(b["caption"][0], str)


def test_shards_split_by_rank_and_worker_and_resume_mid_epoch(shard_dir):
    def epoch(rank: int, workers: int, epoch: int = 1, skip: int = 0) -> list[str]:
        ds = ImageShards(shard_dir, size=8)
        ds.set_loader(batch_size=2, num_workers=workers, num_replicas=2, rank=rank)
        ds.set_position(epoch, skip)
        loader = DataLoader(ds, batch_size=2, num_workers=workers)
        return [c for batch in loader for c in batch["caption"]]

    rank0, rank1 = epoch(0, 0), epoch(1, 0)
    assert len(rank0) == len(rank1) == 12 and not set(rank0) & set(rank1)   # disjoint shards per node
    assert len(set(rank0 + rank1)) == 24 and rank0 != epoch(0, 0, epoch=2)  # every sample; a new order next epoch
    workers = epoch(0, 2)                                                     # 2 workers x 3 batches of 2
    assert len(workers) == 12 and set(workers) <= set(rank0 + rank1)
    assert epoch(0, 2, skip=3) == workers[6:]                                 # after 3 batches: the rest


def test_shard_loader_refuses_too_few_shards_and_mismatched_workers(shard_dir):
    ds = ImageShards(shard_dir, size=8)
    with pytest.raises(ValueError, match="6 shard\\(s\\) cannot feed 2 rank\\(s\\) x 4 worker\\(s\\) = 8 readers"):
        ds.set_loader(batch_size=2, num_workers=4, num_replicas=2)
    with pytest.raises(RuntimeError, match="set up for 0 DataLoader worker"):
        next(iter(DataLoader(ds, batch_size=2, num_workers=2)))
    with pytest.raises(FileNotFoundError, match="make_shards.py"):
        ImageShards(shard_dir / "nowhere")


def test_datamodule_gives_shards_their_loader_and_epoch(shard_dir):
    dm = DataModuleFromConfig(batch_size=4, seed=0, train={"target": "ldm.data.shards.ImageShards",
                                                            "params": {"root": str(shard_dir), "size": 8}})
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 6 and [len(b["caption"]) for b in loader] == [4] * 6
    dm.set_train_position(0, 2)
    assert len(list(dm.train_dataloader())) == 4


# ---------------------------------------------------------------- the sampler and seeded augmentation

def test_resumable_sampler_is_a_function_of_seed_epoch_and_rank():
    data = range(10)
    s = ResumableSampler(data, num_replicas=1, rank=0, seed=3)
    first = list(s)
    assert sorted(first) == list(range(10)) and first == list(s)             # the same pass twice
    s.set_epoch(1)
    assert list(s) != first                                                   # reshuffled per epoch
    s.set_epoch(0)
    s.resume(0, 4)
    assert [(int(i), i.salt) for i in s] == [(int(i), i.salt) for i in first[4:]]
    assert list(s) == first                                                   # the skip is used once
    ranks = [list(ResumableSampler(data, num_replicas=3, rank=r, seed=3)) for r in range(3)]
    assert all(len(r) == 4 for r in ranks) and set().union(*ranks) == set(range(10))
    index = pickle.loads(pickle.dumps(first[0]))                              # as DataLoader workers get it
    assert isinstance(index, SeededIndex) and index == first[0] and index.salt == first[0].salt


def test_seeded_index_fixes_the_augmentation_whatever_the_global_rng():
    photos = Photos("train", size=16, length=4)
    torch.manual_seed(0)
    a = photos[SeededIndex(1, salt=7)]["image"]
    torch.manual_seed(1)
    assert torch.equal(photos[SeededIndex(1, salt=7)]["image"], a)
    assert not torch.equal(photos[SeededIndex(1, salt=8)]["image"], a)
    before = rng_state()
    photos[SeededIndex(2, salt=7)]
    assert same_rng_state(before, rng_state())                                # drew nothing from global RNG


def test_rng_state_survives_a_weights_only_checkpoint_and_preserved_rng_restores_it(tmp_path):
    def draw():
        return torch.rand(3), np.random.rand(), random.random()

    torch.save({"rng": rng_state()}, tmp_path / "state.ckpt")
    a = draw()
    set_rng_state(torch.load(tmp_path / "state.ckpt", weights_only=True)["rng"])
    b = draw()
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    before = rng_state()
    with preserved_rng():
        draw()
    assert same_rng_state(before, rng_state())

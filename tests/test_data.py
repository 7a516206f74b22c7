"""Data layer: Shapes, Photos, ImageFolder and DataModuleFromConfig (batch format of docs/ARCHITECTURE.md)."""
import json
import re
import socket
import warnings

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import SequentialSampler

from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.image_folder import ImageFolder
from ldm.data.photos import TRAIN_PHOTOS, VALIDATION_PHOTOS, Photos, load_photo
from ldm.data.sampler import ResumableSampler
from ldm.data.shapes import COLORS, SHAPE_CLASSES, Shapes
from ldm.util import ConfigError, instantiate_from_config

PAIR = re.compile(r"(small|large) (" + "|".join(COLORS) + r") (" + "|".join(SHAPE_CLASSES) + r")")


def real_rows(objects: torch.Tensor) -> torch.Tensor:
    return objects[objects[:, 0] >= 0]


# ----------------------------------------------------------------------------- Shapes

def test_shapes_sample_format():
    ds = Shapes(size=32, length=50, max_objects=3)
    for i in range(50):
        s = ds[i]
        assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
        assert -1.0 <= s["image"].min() and s["image"].max() <= 1.0
        assert s["class_label"].dtype == torch.int64 and s["class_label"].ndim == 0
        assert 0 <= s["color_label"] < len(COLORS)
        assert s["objects"].shape == (4, 5) and s["objects"].dtype == torch.float32
        assert s["segmentation"].shape == (32, 32) and s["segmentation"].dtype == torch.int64
        rows = real_rows(s["objects"])
        assert 1 <= len(rows) <= 3 and (s["objects"][len(rows):, 0] == -1).all()
        assert ((rows[:, 1:] >= 0) & (rows[:, 1:] <= 1)).all()
        assert (rows[:, 3] > rows[:, 1]).all() and (rows[:, 4] > rows[:, 2]).all()
        assert rows[0, 0] == s["class_label"]
        assert set(s["segmentation"].unique().tolist()) <= set(range(len(SHAPE_CLASSES) + 1))
    with pytest.raises(IndexError):
        ds[50]


def test_shapes_deterministic_by_seed_split_and_index():
    a, b = Shapes(length=20), Shapes(length=20)
    for i in (0, 7, 19):
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"]
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(a[0]["image"], Shapes(split="validation", length=20)[0]["image"])
    assert not torch.equal(a[0]["image"], Shapes(seed=1, length=20)[0]["image"])


def test_shapes_caption_names_objects_and_their_positions():
    ds = Shapes(length=300, max_objects=2)
    for i in range(300):
        s = ds[i]
        rows = real_rows(s["objects"])
        pairs = PAIR.findall(s["caption"])
        assert [SHAPE_CLASSES.index(shape) for _, _, shape in pairs] == rows[:, 0].long().tolist(), s["caption"]
        assert pairs[0][1:] == (COLORS[s["color_label"]], SHAPE_CLASSES[s["class_label"]])
        if len(rows) == 1:
            assert s["caption"] == f"a {' '.join(pairs[0])}"
            continue
        (ax, ay), (bx, by) = [((r[1] + r[3]) / 2, (r[2] + r[4]) / 2) for r in rows]
        expected = {"above": ay < by, "below": ay > by, "to the left of": ax < bx, "to the right of": ax > bx}
        relation = re.search(r"(above|below|to the left of|to the right of)", s["caption"]).group(1)
        assert expected[relation], (s["caption"], rows)


def test_shapes_size_words_match_box_sizes():
    ds = Shapes(length=200, min_objects=2, max_objects=2)
    sides = {"small": [], "large": []}
    for i in range(200):
        s = ds[i]
        for (size, _, _), row in zip(PAIR.findall(s["caption"]), real_rows(s["objects"])):
            sides[size].append(float(row[3] - row[1]))
    assert max(sides["small"]) < min(sides["large"])


def test_shapes_sizes_restricts_the_size_words_and_keeps_the_default_stream():
    large = Shapes(length=50, max_objects=1, sizes=["large"])
    assert all(PAIR.findall(large[i]["caption"])[0][0] == "large" for i in range(50))
    assert Shapes(length=3)[2]["caption"] == Shapes(length=3, sizes=["small", "large"])[2]["caption"]


def test_shapes_boxes_contain_their_segmentation_pixels():
    size = 32
    ds = Shapes(size=size, length=100, max_objects=4)
    for i in range(100):
        s = ds[i]
        seg = s["segmentation"].numpy()
        covered = np.zeros_like(seg, dtype=bool)
        for cls, x0, y0, x1, y1 in real_rows(s["objects"]).tolist():
            r0, r1 = int(np.floor(y0 * size)), int(np.ceil(y1 * size))
            c0, c1 = int(np.floor(x0 * size)), int(np.ceil(x1 * size))
            inside = seg[r0:r1, c0:c1] == cls + 1
            assert inside.sum() > 0.2 * (r1 - r0) * (c1 - c0)  # the box is filled by its shape
            covered[r0:r1, c0:c1] |= inside
        assert np.array_equal(covered, seg > 0)  # no labelled pixel outside the boxes of its class


def test_shapes_background_is_muted_away_from_shapes():
    ds = Shapes(length=100)
    for i in range(100):
        s = ds[i]
        near = torch.nn.functional.max_pool2d((s["segmentation"] > 0).float()[None], 5, 1, 2)[0] > 0
        rgb = (s["image"] + 1) * 127.5  # (3, H, W)
        chroma = rgb.max(0).values - rgb.min(0).values
        assert chroma[~near].max() < 50  # shape colours have a chroma above 170


def test_shapes_holdout_exclude_and_only():
    held = [("red", "triangle"), ("blue", "circle")]
    excl = Shapes(length=400, max_objects=3, holdout="exclude", holdout_pairs=held)
    anchors = set()
    for i in range(400):
        s = excl[i]
        pairs = {(c, shape) for _, c, shape in PAIR.findall(s["caption"])}
        assert not pairs & set(held), s["caption"]
        anchors.add((int(s["color_label"]), int(s["class_label"])))
    assert len(anchors) == len(COLORS) * len(SHAPE_CLASSES) - len(held)
    only = Shapes(length=200, holdout="only", holdout_pairs=held)
    for i in range(200):
        s = only[i]
        assert (COLORS[s["color_label"]], SHAPE_CLASSES[s["class_label"]]) in held


def test_shapes_bad_arguments_are_named():
    with pytest.raises(ValueError, match="purple"):
        Shapes(holdout="exclude", holdout_pairs=[("purple", "circle")])
    with pytest.raises(ValueError, match="max_objects"):
        Shapes(max_objects=5, max_objects_pad=4)
    with pytest.raises(ValueError, match="split"):
        Shapes(split="val")
    with pytest.raises(ValueError, match="huge"):
        Shapes(sizes=["huge"])


# ----------------------------------------------------------------------------- Photos

def test_photos_load_offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    load_photo.cache_clear()
    for name in TRAIN_PHOTOS + VALIDATION_PHOTOS:
        photo = load_photo(name)
        assert photo.mode == "RGB" and min(photo.size) >= 256


def test_photos_validation_is_fixed_and_held_out():
    torch.manual_seed(0)
    a = Photos("validation", size=32, length=10)
    torch.manual_seed(1)
    b = Photos("validation", size=32, length=10, seed=5)
    assert len(a) == 10 and len(Photos("validation")) == 256
    for i in range(10):
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert torch.equal(a[i]["image"], a[i]["image"])
    assert sorted(k for k, _ in a.crops) == [0] * 5 + [1] * 5  # half chelsea, half coffee
    assert not set(TRAIN_PHOTOS) & set(VALIDATION_PHOTOS)
    val_pixels = [np.asarray(load_photo(n)) for n in VALIDATION_PHOTOS]
    for name in TRAIN_PHOTOS:  # no training photograph is a copy of a validation one (skimage's cat = chelsea)
        train = np.asarray(load_photo(name))
        assert all(train.shape != v.shape or not np.array_equal(train, v) for v in val_pixels), name


def test_photos_train_crops_vary_and_are_reproducible():
    ds = Photos("train", size=48, length=8)
    torch.manual_seed(3)
    first = [ds[0]["image"] for _ in range(3)]
    torch.manual_seed(3)
    again = ds[0]["image"]
    assert first[0].shape == (3, 48, 48) and first[0].dtype == torch.float32
    assert -1 <= first[0].min() and first[0].max() <= 1
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    assert torch.equal(first[0], again)
    with pytest.raises(ValueError, match="split"):
        Photos("test")


# ----------------------------------------------------------------------------- ImageFolder

def save_image(path, size=(40, 30), color=(200, 50, 50), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def test_image_folder_recursive_class_folders(tmp_path):
    save_image(tmp_path / "cats" / "a.png")
    save_image(tmp_path / "cats" / "deep" / "er" / "b.jpg")
    save_image(tmp_path / "dogs" / "c.bmp")
    save_image(tmp_path / "dogs" / "d.webp")
    save_image(tmp_path / "dogs" / "e.tiff")
    save_image(tmp_path / "dogs" / ".hidden.png")
    (tmp_path / "dogs" / "notes.csv").write_text("x")
    ds = ImageFolder(tmp_path, size=16)
    assert ds.classes == ["cats", "dogs"] and len(ds) == 5
    labels = [int(ds[i]["class_label"]) for i in range(len(ds))]
    assert labels == [0, 0, 1, 1, 1]
    s = ds[0]
    assert s["image"].shape == (3, 16, 16) and s["image"].dtype == torch.float32
    assert s["class_label"].dtype == torch.int64 and s["caption"] == "" and "objects" not in s
    assert torch.allclose(s["image"][:, 8, 8], torch.tensor([200, 50, 50]) / 127.5 - 1, atol=0.02)


def test_image_folder_root_images_have_class_zero(tmp_path):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.gif", mode="P", color=3)
    ds = ImageFolder(tmp_path, size=8, crop="center")
    assert [int(ds[i]["class_label"]) for i in range(2)] == [0, 0] and ds.classes == [""]


def test_image_folder_converts_every_mode_to_rgb(tmp_path):
    save_image(tmp_path / "grey.png", mode="L", color=255)
    save_image(tmp_path / "rgba.png", mode="RGBA", color=(0, 0, 0, 0))  # fully transparent -> white
    save_image(tmp_path / "palette.png", mode="P", color=1)
    Image.fromarray(np.full((30, 40), 65535, np.uint16)).save(tmp_path / "sixteen.png")
    ds = ImageFolder(tmp_path, size=16, crop="center")
    for i in range(len(ds)):
        image = ds[i]["image"]
        assert image.shape == (3, 16, 16)
        if ds.paths[i].stem != "palette":
            assert torch.allclose(image, torch.ones_like(image)), ds.paths[i].name


def test_image_folder_captions_from_sidecar_and_metadata(tmp_path):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png")
    save_image(tmp_path / "c.png")
    (tmp_path / "a.txt").write_text("  a sidecar caption\n")
    (tmp_path / "b.txt").write_text("ignored: metadata wins")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "from metadata"}) + "\n")
    ds = ImageFolder(tmp_path, size=8)
    assert [ds[i]["caption"] for i in range(3)] == ["a sidecar caption", "from metadata", ""]
    assert [ImageFolder(tmp_path, size=8, captions=False)[i]["caption"] for i in range(3)] == ["", "", ""]


def red_box_image(path, box, size=(200, 100)):
    """A grey picture with a red rectangle over the normalised `box` (x0, y0, x1, y1)."""
    arr = np.full((size[1], size[0], 3), 128, np.uint8)
    x0, y0, x1, y1 = (round(v * s) for v, s in zip(box, size * 2))
    arr[y0:y1, x0:x1] = (255, 0, 0)
    Image.fromarray(arr).save(path)


def test_image_folder_boxes_follow_resize_crop_and_flip(tmp_path):
    box = (0.30, 0.20, 0.50, 0.60)
    red_box_image(tmp_path / "a.png", box)
    lines = [{"file_name": "a.png", "boxes": [[2, *box], [5, 0.0, 0.0, 0.1, 0.1]]}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    centre = ImageFolder(tmp_path, size=50, crop="center", flip=False, max_objects=3)[0]["objects"]
    # side 100 at left 50: x 60..100 px -> 0.1..0.5; the second box lies left of the crop and is dropped
    assert torch.allclose(centre, torch.tensor([[2, 0.1, 0.2, 0.5, 0.6], [-1, 0, 0, 0, 0], [-1, 0, 0, 0, 0]]))
    ds = ImageFolder(tmp_path, size=64, crop="random", flip=True)
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        s = ds[0]
        red = (s["image"][0] > 0.5) & (s["image"][1] < -0.5)  # (H, W)
        cls, x0, y0, x1, y1 = real_rows(s["objects"])[0].tolist()
        cols, rows = red.any(0).nonzero()[:, 0], red.any(1).nonzero()[:, 0]
        assert cls == 2
        assert abs(cols.min() / 64 - x0) <= 1.5 / 64 and abs((cols.max() + 1) / 64 - x1) <= 1.5 / 64
        assert abs(rows.min() / 64 - y0) <= 1.5 / 64 and abs((rows.max() + 1) / 64 - y1) <= 1.5 / 64
        flips.add(x0 > 0.5)
    assert flips == {True, False}  # both orientations were seen


def test_image_folder_without_resize_keeps_native_pixels(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    s = ImageFolder(tmp_path, size=16, crop="center", flip=False, resize=False)[0]
    expected = torch.from_numpy(arr[12:28, 22:38].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(s["image"], expected, atol=1e-6)


def test_image_folder_skips_corrupt_files_with_one_warning(tmp_path):
    save_image(tmp_path / "a_good.png")
    (tmp_path / "b_garbage.png").write_bytes(b"this is not a png at all")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "c_full.png")
    data = (tmp_path / "c_full.png").read_bytes()
    (tmp_path / "c_truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "c_full.png").unlink()
    ds = ImageFolder(tmp_path, size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = [ds[i] for i in range(len(ds))] + [ds[i] for i in range(len(ds))]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and ds.n_skipped == 2
    assert any("b_garbage.png" in m for m in messages) and any("c_truncated.png" in m for m in messages)
    assert all(s["image"].shape == (3, 8, 8) for s in samples)


def test_image_folder_missing_or_empty_root_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no pictures")
    with pytest.raises(ValueError, match="empty"):
        ImageFolder(tmp_path / "empty")


def test_image_folder_bad_metadata_names_file_and_line(tmp_path):
    save_image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n{"file_name": "missing.png"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2.*missing.png"):
        ImageFolder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "boxes": [[0, 0.5, 0.5, 0.2, 0.9]]}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:1.*x0 <= x1"):
        ImageFolder(tmp_path)


# ----------------------------------------------------------------------------- DataModuleFromConfig

SHAPES = "ldm.data.shapes.Shapes"


def make_module(**sections):
    return DataModuleFromConfig(batch_size=4, **sections)


def test_datamodule_batches_with_default_collate(tmp_path):
    save_image(tmp_path / "x" / "a.png")
    save_image(tmp_path / "y" / "b.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x/a.png", "boxes": [[1, 0, 0, 1, 1]]}))
    dm = make_module(train={"target": SHAPES, "params": {"length": 10}},
                     validation={"target": "ldm.data.image_folder.ImageFolder",
                                 "params": {"root": str(tmp_path), "size": 16, "max_objects": 3}})
    dm.setup("fit")
    train = dm.train_dataloader()
    assert isinstance(train.sampler, ResumableSampler) and train.sampler.shuffle
    batch = next(iter(train))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["class_label"].shape == (4,)
    assert batch["objects"].shape == (4, 4, 5) and batch["segmentation"].shape == (4, 32, 32)
    assert batch["segmentation"].dtype == torch.int64 and len(batch["caption"]) == 4
    val = dm.val_dataloader()
    assert isinstance(val.sampler, SequentialSampler)
    batch = next(iter(val))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["objects"].shape == (2, 3, 5)
    assert batch["class_label"].tolist() == [0, 1] and batch["caption"] == ["", ""]


def test_datamodule_only_given_sections_have_loaders():
    from pytorch_lightning.utilities.model_helpers import is_overridden

    dm = make_module(train={"target": SHAPES})
    assert is_overridden("train_dataloader", dm)
    assert not is_overridden("val_dataloader", dm) and not is_overridden("test_dataloader", dm)
    dm = make_module(validation={"target": SHAPES, "params": {"split": "validation"}})
    dm.setup("validate")
    assert set(dm.datasets) == {"validation"} and is_overridden("val_dataloader", dm)
    assert not is_overridden("train_dataloader", dm)


def test_datamodule_from_compvis_yaml_with_workers():
    cfg = OmegaConf.create("""
    target: ldm.data.datamodule.DataModuleFromConfig
    params:
      batch_size: 3
      num_workers: 2
      wrap: true
      train: {target: ldm.data.photos.Photos, params: {size: 16, length: 6}}
      validation: {target: ldm.data.photos.Photos, params: {split: validation, size: 16, length: 6}}
    """)
    dm = instantiate_from_config(cfg, where="data")
    dm.setup()
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2
    images = torch.cat([b["image"] for b in loader])
    assert images.shape == (6, 3, 16, 16)
    assert not torch.equal(images[0], images[3])  # a fresh crop per sample


def test_datamodule_bad_config_is_named():
    with pytest.raises(ConfigError, match="batch_size"):
        DataModuleFromConfig(batch_size=0, train={"target": SHAPES})
    dm = make_module(train={"target": SHAPES, "params": {"lenght": 5}})
    with pytest.raises(ConfigError, match=r"data.params.train.params.lenght.*length"):
        dm.setup("fit")
    with pytest.raises(ConfigError, match="at least one"):
        DataModuleFromConfig(batch_size=2)

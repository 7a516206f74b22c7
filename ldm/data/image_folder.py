"""ImageFolder: train on your own pictures, with optional class folders, captions and boxes.

Layout read from `root` (searched recursively; hidden files and folders are ignored):

    root/
      metadata.jsonl          optional: {"file_name": "cats/a.jpg", "text": "...", "boxes": [[cls, x0, y0, x1, y1], ...]}
      cats/a.jpg  cats/a.txt  a sidecar caption (used when metadata.jsonl gives no text for the file)
      dogs/sub/b.png          class = first-level folder ("dogs"), however deep the file sits

Boxes are normalised to the original picture and follow every resize, crop and flip.
"""
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image, ImageOps

from ldm.data.transforms import call_rng, index_salt, pad_objects, square_crop, to_rgb, to_tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
METADATA_FILE = "metadata.jsonl"


class ImageFolder(torch.utils.data.Dataset):
    """A folder of images -> {image, class_label, caption[, objects]} (docs/ARCHITECTURE.md batch format).

    Each picture has its shorter side resized to `size` (or is used at native resolution when
    `resize=False`), then a size x size crop is cut at random ("random") or in the centre
    ("center") and mirrored with probability 0.5 when `flip`. Class labels index `self.classes`,
    the sorted first-level sub-folder names ("" for pictures lying in `root` itself). A file that
    cannot be decoded is skipped with one warning naming it (counted in `n_skipped`, per process)
    and the next readable picture is returned in its place.
    """

    def __init__(self,
                 root: str | Path,
                 size: int = 256,                       # output side in pixels
                 crop: str = "random",                  # "random" | "center"
                 flip: bool = True,                     # random horizontal mirror
                 resize: bool = True,                   # shorter side -> size before cropping
                 extensions: Iterable[str] | None = None,  # default IMAGE_EXTENSIONS
                 captions: bool = True,                 # read sidecar .txt / metadata.jsonl text
                 class_labels: bool = True,             # label by first-level sub-folder
                 max_objects: int = 30,                 # rows of `objects` (padding class -1)
                 seed: int = 0):                        # mixed into the per-call crop RNG
        check_view("ImageFolder", size, crop)
        self.root = Path(root).expanduser()
        self.size, self.crop, self.flip, self.resize = size, crop, flip, resize
        self.view = ImageView(size, crop, flip, resize)
        self.max_objects, self.seed = max_objects, seed
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower()
                                for e in (extensions or IMAGE_EXTENSIONS))
        self.paths = find_images(self.root, self.extensions)
        folders = [_class_folder(self.root, p) if class_labels else "" for p in self.paths]
        self.classes = sorted(set(folders))
        index = {name: i for i, name in enumerate(self.classes)}
        self.labels = [index[f] for f in folders]
        meta = read_metadata(self.root, self.paths, max_objects)
        self.has_boxes = any("boxes" in m for m in meta.values())
        self.captions = [_caption(p, meta.get(p, {})) if captions else "" for p in self.paths]
        self.boxes = [np.asarray(meta.get(p, {}).get("boxes", []), np.float32).reshape(-1, 5)
                      for p in self.paths]
        self.n_skipped = 0
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"ImageFolder index {i} out of range for {len(self)} images")
        salt = index_salt(i)  # one augmentation seed, also for the picture that replaces an unreadable one
        for j in [k % len(self) for k in range(i, i + len(self))]:
            if j in self._bad:
                continue
            try:
                return self._load(j, salt)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                self._skip(j, err)
        raise RuntimeError(f"ImageFolder: no readable image left under {self.root}")

    def _skip(self, j: int, err: Exception) -> None:
        self._bad.add(j)
        self.n_skipped += 1
        warnings.warn(f"ImageFolder: skipping unreadable image {self.paths[j]} ({type(err).__name__}: {err})",
                      stacklevel=3)

    def _load(self, j: int, salt: int) -> dict[str, Any]:
        with Image.open(self.paths[j]) as img:
            img = self.view.open(img)
        return self.view.sample(img, call_rng(self.seed, j, salt), self.labels[j], self.captions[j],
                                self.boxes[j] if self.has_boxes else None, self.max_objects)


def check_view(owner: str, size: int, crop: str) -> None:
    if crop not in ("random", "center"):
        raise ValueError(f"{owner}: crop must be 'random' or 'center', got {crop!r}")
    if size <= 0:
        raise ValueError(f"{owner}: size must be positive, got {size}")


@dataclass(frozen=True)
class ImageView:
    """How a picture becomes a training sample (ImageFolder, ImageShards): shorter side -> size (`resize`),
    a size x size crop at random or in the centre, mirrored with p = 0.5 when `flip`; boxes follow."""
    size: int
    crop: str = "random"
    flip: bool = True
    resize: bool = True

    def open(self, img: Image.Image) -> Image.Image:
        """A freshly opened PIL image -> RGB, EXIF orientation applied (JPEGs decoded at a reduced scale if
        that still covers `size`)."""
        if self.resize:
            img.draft(img.mode, (self.size, self.size))
        return to_rgb(ImageOps.exif_transpose(img))

    def sample(self, img: Image.Image, rng: np.random.Generator, label: int, caption: str,
               boxes: np.ndarray | None, max_objects: int) -> dict[str, Any]:
        """{image, class_label, caption[, objects]} (docs/ARCHITECTURE.md batch format); objects when boxes given."""
        w, h = img.size
        side = min(w, h) if self.resize else self.size
        crop = square_crop(w, h, side, rng, center=self.crop == "center", flip=self.flip)
        sample = {"image": to_tensor(crop.apply(img, self.size)),
                  "class_label": torch.tensor(label, dtype=torch.int64),
                  "caption": caption}
        if boxes is not None:
            sample["objects"] = pad_objects(crop.apply_boxes(boxes), max_objects)
        return sample


def find_images(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Sorted image files under `root` (recursive, hidden entries ignored); errors name `root`."""
    if not root.exists():
        raise FileNotFoundError(f"ImageFolder: root {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"ImageFolder: root {str(root)!r} is not a directory")
    paths = sorted(p for p in root.rglob("*")
                   if p.suffix.lower() in extensions and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not paths:
        raise ValueError(f"ImageFolder: no images with extensions {', '.join(extensions)} under {str(root)!r}")
    return paths


def _class_folder(root: Path, path: Path) -> str:
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else ""


def _caption(path: Path, meta: dict) -> str:
    if "text" in meta:
        return str(meta["text"]).strip()
    sidecar = path.with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""


def read_metadata(root: Path, paths: list[Path], max_objects: int) -> dict[Path, dict]:
    """`root/metadata.jsonl` -> {image path: entry}; malformed lines are errors naming file and line."""
    file = root / METADATA_FILE
    if not file.is_file():
        return {}
    known = set(paths)
    meta = {}
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}:{n}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from err
        if not isinstance(entry, dict) or "file_name" not in entry:
            raise ValueError(f"{where}: each line must be an object with a 'file_name' key")
        path = root / entry["file_name"]
        if path not in known:
            raise ValueError(f"{where}: file_name {entry['file_name']!r} is not an image under {str(root)!r}")
        if "boxes" in entry:
            entry["boxes"] = _check_boxes(entry["boxes"], where, max_objects)
        meta[path] = entry
    return meta


def _check_boxes(boxes: Any, where: str, max_objects: int) -> list[list[float]]:
    try:
        arr = np.asarray(boxes, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: 'boxes' must be a list of [class, x0, y0, x1, y1]") from err
    if arr.size == 0:
        return []
    if arr.ndim != 2 or arr.shape[1] != 5:
        raise ValueError(f"{where}: 'boxes' must be a list of [class, x0, y0, x1, y1], got shape {arr.shape}")
    if len(arr) > max_objects:
        raise ValueError(f"{where}: {len(arr)} boxes exceed max_objects={max_objects}")
    coords = arr[:, 1:]
    if ((coords < 0) | (coords > 1)).any() or (arr[:, 3] < arr[:, 1]).any() or (arr[:, 4] < arr[:, 2]).any():
        raise ValueError(f"{where}: boxes need 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1 (normalised corners)")
    return arr.tolist()

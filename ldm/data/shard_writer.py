"""write_shards: an ImageFolder (class folders, captions, boxes) as WebDataset tar shards plus index.json.

Each sample is `<8-digit key>.<ext>` (the picture: its original bytes, or resized with `resize` and re-encoded,
JPEG as JPEG (quality 95), anything else as PNG) and `<key>.json` ({"file_name", "class_label", "class_name",
"caption", "boxes"}). Samples are shuffled once (seed) so that every shard mixes the classes; shards and the
index are written atomically (temporary file + rename), so an interrupted run leaves no half-written shard under
a final name.
"""
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ldm.checkpoint import save_text_atomic
from ldm.data.image_folder import ImageFolder
from ldm.data.shards import INDEX_FILE, INDEX_FORMAT
from ldm.data.transforms import RESAMPLE, to_rgb

SHARD_NAME = "shard-{:06d}.tar"
MTIME = 0.0  # fixed member times: the same input gives byte-identical shards


def encode_picture(path: Path, resize: int | None) -> tuple[bytes, str]:
    """(bytes, extension) of one picture: the file as it is, or shorter side -> `resize`, re-encoded as JPEG
    (quality 95) when it was one, else as PNG. Decoding it fully first catches truncated files."""
    ext = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
    with Image.open(path) as img:
        img.load()
        if resize is None:
            return path.read_bytes(), ext
        img = to_rgb(img)
        w, h = img.size
        scale = resize / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), RESAMPLE)
    buffer = io.BytesIO()
    if ext == "jpg":
        img.save(buffer, format="JPEG", quality=95)
        return buffer.getvalue(), "jpg"
    img.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def write_shards(root: str | Path, out: str | Path, shard_size: int = 1000, resize: int | None = None,
                 seed: int = 0, shuffle: bool = True, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Write `out/shard-NNNNNN.tar` and `out/index.json` from the image folder `root`; returns the index."""
    import webdataset as wds  # lazy: only shard writing needs it

    if shard_size < 1:
        raise ValueError(f"make_shards: shard_size must be >= 1, got {shard_size}")
    if resize is not None and resize < 1:
        raise ValueError(f"make_shards: resize must be a positive side in pixels, got {resize}")
    folder = ImageFolder(root, size=1)  # lists pictures, class folders, captions and boxes; decodes nothing
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / INDEX_FILE).exists() or list(out.glob("shard-*.tar")):
        raise FileExistsError(f"make_shards: {str(out)!r} already holds shards; choose an empty folder")
    order = np.random.default_rng(seed).permutation(len(folder)) if shuffle else np.arange(len(folder))
    shards: list[dict[str, Any]] = []
    skipped: list[str] = []
    writer, count, tmp = None, 0, None
    for key, i in enumerate(order):
        path = folder.paths[i]
        try:
            data, ext = encode_picture(path, resize)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            warnings.warn(f"make_shards: skipping unreadable image {path} ({type(err).__name__}: {err})")
            skipped.append(str(path))
            continue
        if writer is None:
            name = SHARD_NAME.format(len(shards))
            tmp = out / f".{name}.tmp"
            writer, count = wds.TarWriter(str(tmp), encoder=False, mtime=MTIME), 0
        meta = {"file_name": str(path.relative_to(folder.root)), "class_label": folder.labels[i],
                "class_name": folder.classes[folder.labels[i]], "caption": folder.captions[i],
                "boxes": folder.boxes[i].tolist()}
        writer.write({"__key__": f"{key:08d}", ext: data, "json": json.dumps(meta).encode("utf-8")})
        count += 1
        if count == shard_size:
            shards.append(_finish(writer, tmp, out, name, count, progress))
            writer = None
    if writer is not None:
        shards.append(_finish(writer, tmp, out, name, count, progress))
    if not shards:
        raise ValueError(f"make_shards: no readable image under {str(folder.root)!r}")
    index = {"format": INDEX_FORMAT, "version": 1, "source": str(folder.root),
             "samples": sum(s["samples"] for s in shards), "shards": shards, "classes": folder.classes,
             "has_boxes": folder.has_boxes, "resize": resize, "seed": seed if shuffle else None, "skipped": skipped}
    save_text_atomic(json.dumps(index, indent=1) + "\n", out / INDEX_FILE)
    progress(f"wrote {index['samples']} samples in {len(shards)} shard(s) and {out / INDEX_FILE}"
             + (f"; skipped {len(skipped)} unreadable image(s)" if skipped else ""))
    return index


def _finish(writer: Any, tmp: Path, out: Path, name: str, count: int, progress: Callable[[str], None]) -> dict:
    writer.close()
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out / name)
    progress(f"{out / name}: {count} samples")
    return {"file": name, "samples": count}

"""Conditions from the command line (scripts/sample.py): which flag a model takes, and the flag values
(class labels or names, captions, box layouts, images, masks) turned into the model's condition dict.

A `Condition` is one grid row: the condition dict for a batch of one, how samples.json describes it, its
file-name slug and, for inpainting, the known picture and mask that are pasted back after sampling.
"""
import argparse
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ldm.data.image_folder import ImageFolder
from ldm.data.shapes import SHAPE_CLASSES
from ldm.modules.encoders import (ClassEmbedder, FrozenTextEmbedder, LayoutEmbedder, SpatialRescaler,
                                  TransformerTextEmbedder)
from ldm.visualization import from_pil


class SamplingError(ValueError):
    """A command line that does not fit the model, or unusable inputs; the message says what to change."""


FLAGS = {"class": "--class", "text": "--prompt/--prompts", "layout": "--layout", "image": "--image", "mask": "--mask"}
INTEGER = re.compile(r"-?\d+")
KINDS = {  # model kind -> (the flags it takes, how messages name it)
    "unconditional": ((), "an unconditional model"),
    "class": (("class",), "a class-conditional model"),
    "text": (("text",), "a text-conditional model"),
    "layout": (("layout",), "a layout-conditional model"),
    "image": (("image",), "an image-conditional model (super-resolution / semantic map)"),
    "inpainting": (("image", "mask"), "an inpainting model"),
    "lr_image": (("image",), "a StableSR super-resolution model (--image: the low-resolution picture)"),
}


@dataclass
class Condition:
    """One grid row of samples."""
    cond: dict[str, torch.Tensor]                          # model condition dict, batch of one
    info: dict[str, Any]                                   # what samples.json says about it
    slug: str                                              # file-name part
    known: tuple[torch.Tensor, torch.Tensor] | None = None  # inpainting: image (1, 3, H, W), mask (1, 1, H, W)


# ---- which condition --------------------------------------------------------------------------------------------
def model_kind(model: nn.Module) -> str:
    """Which condition the model samples from (a key of KINDS), read from its conditioner."""
    c = getattr(model, "cond_stage_model", None)
    inpaint = getattr(model, "masked_image_key", None) is not None
    if callable(getattr(model, "lr_condition", None)):
        return "lr_image"                                  # StableSR: the LR picture (its prompt is empty)
    if c is not None and inpaint:
        raise SamplingError(f"a hybrid model (conditioner {type(c).__name__} plus inpainting) is not supported by "
                            "sample.py; call model.sample in Python")
    if inpaint:
        return "inpainting"
    if c is None:
        return "unconditional"
    for kind, classes in (("class", ClassEmbedder), ("layout", LayoutEmbedder),
                          ("text", (FrozenTextEmbedder, TransformerTextEmbedder))):
        if isinstance(c, classes):
            return kind
    if compvis_inpainting(model):
        return "inpainting"
    if model.cond_stage_keyword == "c_concat":
        return "image"
    raise SamplingError(f"sample.py cannot build conditions for the conditioner {type(c).__name__} "
                        f"(conditioning_key {model.conditioning_key!r}); call model.sample in Python")


def compvis_inpainting(model: nn.Module) -> bool:
    """CompVis' inpainting layout (models/ldm/inpainting_big): the first stage is the conditioner (concat) and the
    U-Net reads x_t, the masked image's latent and the mask: in_channels = 2 * channels + 1."""
    return (getattr(model, "cond_stage_model", None) is model.first_stage_model
            and model.cond_stage_keyword == "c_concat"
            and model.model.diffusion_model.in_channels == 2 * model.channels + 1)


def inpainting_concat(model: nn.Module, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """c_concat of an inpainting model: [latent of the masked image, mask at the latent size] (1, C_z + 1, h, w)."""
    if model.masked_image_key is not None:
        return model.inpainting_condition({model.masked_image_key: image * (1 - mask), model.mask_key: mask})
    z = model.get_learned_conditioning(image * (1 - mask))                               # CompVis' layout
    return torch.cat([z, F.interpolate(mask, size=z.shape[-2:], mode="nearest").to(z)], dim=1)


def describe(model: nn.Module, kind: str) -> str:
    c = getattr(model, "cond_stage_model", None)
    parts = [type(model).__name__, f"conditioning_key {getattr(model, 'conditioning_key', None)!r}"]
    parts += [f"conditioner {type(c).__name__}"] if c is not None else []
    return f"{KINDS[kind][1]} ({', '.join(parts)})"


def check_flags(opt: argparse.Namespace, model: nn.Module, kind: str) -> None:
    """The condition flags given must be exactly those the model takes; guidance needs a condition."""
    init_image = getattr(opt, "init_image", None)
    if kind == "inpainting" and init_image:
        raise SamplingError(f"--init-image does not fit this model: it is {describe(model, kind)}, which takes the "
                            "picture as --image (with --mask)")
    if opt.masks and kind != "inpainting" and not init_image:
        raise SamplingError(f"--mask needs --init-image (the picture whose white region is regenerated) for "
                            f"{describe(model, kind)}")
    edit_mask = bool(init_image) and kind != "inpainting"  # --mask belongs to --init-image
    given = {"class": opt.classes, "text": opt.prompts or opt.prompts_file, "layout": opt.layouts,
             "image": opt.images, "mask": None if edit_mask else opt.masks}
    takes = KINDS[kind][0]
    wanted = " and ".join(FLAGS[f] for f in takes) or "no condition flag"
    extra = [FLAGS[f] for f, value in given.items() if value and f not in takes]
    if extra:
        raise SamplingError(f"{' and '.join(extra)} {'does' if len(extra) == 1 else 'do'} not fit this model: it is "
                            f"{describe(model, kind)}, which takes {wanted}")
    missing = [FLAGS[f] for f in takes if not given[f]]
    if missing:
        raise SamplingError(f"{' and '.join(missing)} missing: the model is {describe(model, kind)}, which takes "
                            f"{wanted}")
    if opt.scale != 1.0 and kind == "unconditional":
        raise SamplingError(f"--scale {opt.scale}: classifier-free guidance needs a conditional model; this one is "
                            f"{describe(model, kind)}")


def build_conditions(opt: argparse.Namespace, model: nn.Module, kind: str, config: DictConfig) -> list[Condition]:
    """One Condition per flag value (one for an unconditional model)."""
    check_flags(opt, model, kind)
    if kind == "unconditional":
        return [Condition({}, {}, "sample")]
    build = {"class": class_conditions, "text": text_conditions, "layout": layout_conditions,
             "image": image_conditions, "inpainting": inpainting_conditions, "lr_image": lr_image_conditions}[kind]
    with torch.no_grad():
        return build(opt, model, config)


def encoded(model: nn.Module, raw: Any) -> dict[str, torch.Tensor]:
    return model.as_condition(model.get_learned_conditioning(raw))


def slugify(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")


# ---- class labels and layouts -------------------------------------------------------------------------------------
def _training_data(config: DictConfig) -> DictConfig | None:
    """The training (else validation) dataset's {target, params}, task wrappers' `dataset` unwrapped."""
    node = OmegaConf.select(config, "data.params.train") or OmegaConf.select(config, "data.params.validation")
    while node is not None and "dataset" in (node.get("params") or {}):
        node = node.params.dataset
    return node


def class_names(config: DictConfig, boxes: bool = False, scan: bool = True) -> list[str] | None:
    """Names of the class indices of the model's data: the Shapes classes, or (labels, not boxes, when `scan`) the
    image folder's sub-folders as ImageFolder lists them; None when the config does not tell."""
    data = _training_data(config)
    target = str(data.get("target", "")) if data is not None else ""
    if target.endswith("shapes.Shapes"):
        return list(SHAPE_CLASSES)
    if boxes or not scan or not target.endswith("image_folder.ImageFolder"):
        return None
    params = data.get("params")
    root = OmegaConf.select(params, "root", throw_on_missing=False) if params is not None else None
    if root is None or not params.get("class_labels", True):
        return None
    try:
        return ImageFolder(root, extensions=params.get("extensions"), captions=False).classes
    except (OSError, ValueError) as err:
        raise SamplingError(f"class names are the sub-folders of the training images, which cannot be listed "
                            f"({err}); give integer labels") from None


def class_index(value: Any, names: Sequence[str] | None, n_classes: int, flag: str) -> int:
    """An integer label or a class name -> the index, checked against n_classes."""
    if isinstance(value, int) or (isinstance(value, str) and INTEGER.fullmatch(value)):
        k = int(value)
    elif names is not None and value in names:
        k = list(names).index(value)
    else:
        known = f"one of {list(names)[:20]}{' ...' if len(names) > 20 else ''}" if names else \
            "an integer (the model's config names no classes: its data is neither Shapes nor an image folder)"
        raise SamplingError(f"{flag} {value!r}: unknown class; give {known}")
    if not 0 <= k < n_classes:
        raise SamplingError(f"{flag} {value!r}: class index {k} is outside [0, {n_classes})")
    return k


def _name(k: int, names: Sequence[str] | None) -> str | None:
    return names[k] if names is not None and k < len(names) and names[k] else None


def class_conditions(opt: argparse.Namespace, model: nn.Module, config: DictConfig) -> list[Condition]:
    names = class_names(config, scan=not all(INTEGER.fullmatch(v) for v in opt.classes))
    out = []
    for value in opt.classes:
        k = class_index(value, names, model.cond_stage_model.n_classes, "--class")
        name = _name(k, names)
        info = {"class": k} | ({"class_name": name} if name else {})
        out.append(Condition(encoded(model, torch.tensor([k])), info, slugify(name or f"class-{k}")))
    return out


def parse_layout(value: str, names: Sequence[str] | None, n_classes: int, max_objects: int) -> list[list[float]]:
    """--layout (a JSON string or a file holding one) -> rows [class, x0, y0, x1, y1], checked."""
    text = open(value, encoding="utf-8").read() if os.path.isfile(value) else value
    where = f"--layout {value if len(value) < 60 else value[:57] + '...'!r}"
    try:
        objects = json.loads(text)
    except json.JSONDecodeError as err:
        raise SamplingError(f"{where}: neither a file nor valid JSON ({err})") from None
    if not isinstance(objects, list) or not all(isinstance(o, list) and len(o) == 5 for o in objects):
        raise SamplingError(f"{where}: expected a list of [class, x0, y0, x1, y1] objects")
    if len(objects) > max_objects:
        raise SamplingError(f"{where}: {len(objects)} objects; the model takes at most {max_objects}")
    rows = []
    for cls, *box in objects:
        if not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in box) or box[0] > box[2] or box[1] > box[3]:
            raise SamplingError(f"{where}: box {box} needs 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1 (normalised)")
        rows.append([class_index(cls, names, n_classes, where), *map(float, box)])
    return rows


def layout_conditions(opt: argparse.Namespace, model: nn.Module, config: DictConfig) -> list[Condition]:
    embedder, names = model.cond_stage_model, class_names(config, boxes=True)
    out = []
    for value in opt.layouts:
        rows = parse_layout(value, names, embedder.n_classes, embedder.max_objects)
        objects = torch.tensor(rows, dtype=torch.float32).reshape(1, -1, 5)            # (1, n, 5)
        labelled = [(int(r[0]), _name(int(r[0]), names), r[1:]) for r in rows]
        info = {"layout": [{"class": k, "box": box} | ({"class_name": name} if name else {})
                           for k, name, box in labelled]}
        slug = "-".join(name or f"class-{k}" for k, name, _ in labelled) or "empty-layout"
        out.append(Condition(encoded(model, objects), info, slugify(slug)))
    return out


# ---- captions -----------------------------------------------------------------------------------------------------
def text_conditions(opt: argparse.Namespace, model: nn.Module, config: DictConfig) -> list[Condition]:
    prompts = list(opt.prompts or [])
    if opt.prompts_file:
        if not os.path.isfile(opt.prompts_file):
            raise FileNotFoundError(f"--prompts {opt.prompts_file!r}: no such file")
        with open(opt.prompts_file, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
        if not lines:
            raise SamplingError(f"--prompts {opt.prompts_file!r}: the file holds no prompt")
        prompts += lines
    check = getattr(model.cond_stage_model, "check_length", None)
    if callable(check):
        try:
            check(prompts)
        except ValueError as err:
            raise SamplingError(f"--prompt: {err}") from None
    return [Condition(encoded(model, [p]), {"prompt": p}, slugify(p) or "empty-prompt") for p in prompts]


# ---- images -------------------------------------------------------------------------------------------------------
def read_image(path: str, flag: str = "--image") -> torch.Tensor:
    """An RGB picture as (1, 3, H, W) in [-1, 1]."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path!r}: no such file")
    with Image.open(path) as im:
        return from_pil([im.convert("RGB")])


def read_mask(path: str) -> torch.Tensor:
    """A mask picture as (1, 1, H, W) in {0, 1}: 1 (fill) where it is brighter than mid-grey."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--mask {path!r}: no such file")
    with Image.open(path) as im:
        grey = np.asarray(im.convert("L"), dtype=np.float32)                          # (H, W)
    return torch.from_numpy(grey > 127.5).float()[None, None]


def read_label_map(path: str, n_classes: int) -> torch.Tensor:
    """A one-channel PNG of class indices (mode L, P or I; grey RGB too) as (1, H, W) int64."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--image {path!r}: no such file")
    with Image.open(path) as im:
        labels = np.asarray(im).astype(np.int64)
    if labels.ndim == 3 and (labels[..., :3] == labels[..., :1]).all():
        labels = labels[..., 0]
    if labels.ndim != 2:
        raise SamplingError(f"--image {path!r}: a semantic map must be a one-channel PNG of class indices "
                            f"(mode L or P), got a colour picture")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise SamplingError(f"--image {path!r}: label values must lie in [0, {n_classes}), got "
                            f"[{labels.min()}, {labels.max()}]")
    return torch.from_numpy(labels)[None]


def check_latent_size(model: nn.Module, cond: dict[str, torch.Tensor], pixels: tuple[int, int], path: str) -> None:
    """The latents a spatial condition sets must halve cleanly at every U-Net level."""
    h, w = cond["c_concat"].shape[-2:]
    m = 2 ** (len(model.model.diffusion_model.channel_mult) - 1)
    if h % m or w % m:
        step = m * max(1, pixels[0] // h)
        raise SamplingError(f"--image {path!r} ({pixels[1]}x{pixels[0]} px) gives {w}x{h} latents; the U-Net needs "
                            f"multiples of {m}: resize the picture to multiples of {step} pixels")


def image_conditions(opt: argparse.Namespace, model: nn.Module, config: DictConfig) -> list[Condition]:
    c = model.cond_stage_model
    semantic = isinstance(c, SpatialRescaler) and c.n_classes is not None
    out = []
    for path in opt.images:
        raw = read_label_map(path, c.n_classes) if semantic else read_image(path)
        cond = encoded(model, raw)
        check_latent_size(model, cond, tuple(raw.shape[-2:]), path)
        out.append(Condition(cond, {"image": path}, slugify(os.path.splitext(os.path.basename(path))[0])))
    return out


def lr_image_conditions(opt: argparse.Namespace, model: nn.Module, config: DictConfig) -> list[Condition]:
    """StableSR: each LR picture upsampled by the model's sr_scale, encoded (`c_lr`), with the empty prompt."""
    out = []
    for path in opt.images:
        raw = read_image(path)
        cond = model.lr_condition(raw)
        check_latent_size(model, {"c_concat": cond["c_lr"]}, tuple(raw.shape[-2:]), path)
        out.append(Condition(cond, {"image": path}, slugify(os.path.splitext(os.path.basename(path))[0])))
    return out


def inpainting_conditions(opt: argparse.Namespace, model: nn.Module, config: DictConfig) -> list[Condition]:
    if len(opt.masks) not in (1, len(opt.images)):
        raise SamplingError(f"--mask: give one mask, or one per --image ({len(opt.images)}); got {len(opt.masks)}")
    encoder = getattr(model.first_stage_model, "encoder", None)
    f = encoder.downsampling_factor if encoder is not None else 1
    m = f * 2 ** (len(model.model.diffusion_model.channel_mult) - 1)
    out = []
    for i, path in enumerate(opt.images):
        mask_path = opt.masks[i if len(opt.masks) > 1 else 0]
        image, mask = read_image(path), read_mask(mask_path)
        (h, w), size = image.shape[-2:], tuple(mask.shape[-2:])
        if size != (h, w):
            raise SamplingError(f"--mask {mask_path!r} is {size[1]}x{size[0]} px, --image {path!r} {w}x{h} px")
        if h % m or w % m:
            raise SamplingError(f"--image {path!r} is {w}x{h} px; this model needs multiples of {m} pixels")
        cond = model.as_condition({"c_concat": inpainting_concat(model, image, mask)})
        info = {"image": path, "mask": mask_path}
        out.append(Condition(cond, info, slugify(os.path.splitext(os.path.basename(path))[0]), (image, mask)))
    return out

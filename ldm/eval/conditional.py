"""Does the model draw what it is asked? Probe verdicts on conditional Shapes samples (`--task conditional`).

The requests, one grid row each, cover every value of the condition evenly:
- class: each Shapes class; verdict "the probe reads the requested class" (`class`).
- text: the prompt "a large {colour} {shape}" for every colour-shape pair; verdicts `class`, `color` and
  `class_and_color` (both right), reported separately for the pairs the training data held out
  (`heldout/...`, when its config sets `holdout: exclude`) and the others (`seen/...`).
- layout: the object lists of real held-out images (their boxes, classes, positions); verdicts
  `centre_in_box` (the probe's centre of the dominant object lies in the requested dominant box) and
  `class` (the probe reads the requested class for it).
The probe reads the dominant (largest) object: prompts name one object; layouts request several, and the
first, largest one is checked.
"""
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from ldm.data.shapes import COLORS, DEFAULT_HOLDOUT_PAIRS, SHAPE_CLASSES, pair_indices
from ldm.eval.probe import ShapesProbe, centre_in_box
from ldm.sampling_cli import sample_batch
from ldm.sampling_conditions import Condition, SamplingError, encoded

PROMPT = "a large {color} {shape}"


@dataclass
class Request:
    """One condition and what the probe must read from its samples."""
    condition: Condition
    group: str                          # metric prefix: "" or "seen/" / "heldout/"
    target: dict[str, torch.Tensor]     # class (), color (), box (4,) as needed


def class_requests(model: nn.Module) -> list[Request]:
    n_classes = model.cond_stage_model.n_classes
    if n_classes != len(SHAPE_CLASSES):
        raise SamplingError(f"--task conditional: a Shapes class model has {len(SHAPE_CLASSES)} classes, this one "
                         f"{n_classes}; the probe only reads Shapes")
    return [Request(Condition(encoded(model, torch.tensor([k])), {"class": k}, name), "",
                    {"class": torch.tensor(k)}) for k, name in enumerate(SHAPE_CLASSES)]


def heldout_pairs(config: DictConfig) -> set[tuple[int, int]]:
    """(colour, shape) index pairs the training data never drew (Shapes `holdout: exclude`)."""
    params = OmegaConf.select(config, "data.params.train.params") or {}
    if params.get("holdout") != "exclude":
        return set()
    pairs = params.get("holdout_pairs")
    return set(pair_indices(DEFAULT_HOLDOUT_PAIRS if pairs is None else pairs))


def text_requests(model: nn.Module, config: DictConfig) -> list[Request]:
    held = heldout_pairs(config)
    out = []
    for color, shape in itertools.product(range(len(COLORS)), range(len(SHAPE_CLASSES))):
        prompt = PROMPT.format(color=COLORS[color], shape=SHAPE_CLASSES[shape])
        group = "heldout/" if (color, shape) in held else "seen/"
        out.append(Request(Condition(encoded(model, [prompt]), {"prompt": prompt}, prompt), group,
                           {"class": torch.tensor(shape), "color": torch.tensor(color)}))
    return out


def layout_requests(model: nn.Module, dataset: Sequence[dict[str, Any]], count: int) -> list[Request]:
    """The object lists of the first `count` images of `dataset` (rows class, x0, y0, x1, y1; -1 pads)."""
    if len(dataset) < count:
        raise SamplingError(f"--task conditional: the layouts come from the evaluation split, which holds "
                         f"{len(dataset)} images; {count} are needed (raise its length or lower --n)")
    out = []
    max_objects = model.cond_stage_model.max_objects
    for i in range(count):
        objects = dataset[i]["objects"][:max_objects]                       # (max_objects, 5)
        first = objects[0]
        out.append(Request(Condition(encoded(model, objects[None]), {"layout_of_image": i}, f"layout-{i}"), "",
                           {"class": first[0].long(), "box": first[1:5]}))
    return out


def verdicts(probe: ShapesProbe, images: torch.Tensor, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per sample booleans (n,) for every attribute the target names."""
    pred = probe.predict(images.clamp(-1, 1))
    out = {}
    if "class" in target:
        out["class"] = pred["class"] == target["class"]
    if "color" in target:
        out["color"] = pred["color"] == target["color"]
        out["class_and_color"] = out["class"] & out["color"]
    if "box" in target:
        out["centre_in_box"] = centre_in_box(pred["centre"], target["box"].expand(len(images), 4))
    return out


def score_requests(probe: ShapesProbe, requests: Sequence[Request], samples: Sequence[torch.Tensor]
                   ) -> dict[str, float]:
    """Rates per group and attribute, over every sample of every request; `<group>samples` counts them."""
    hits: dict[str, list[torch.Tensor]] = {}
    for request, images in zip(requests, samples):
        for key, ok in verdicts(probe, images, request.target).items():
            hits.setdefault(request.group + key, []).append(ok)
        hits.setdefault(request.group + "samples", []).append(torch.ones(len(images), dtype=torch.bool))
    return {key: (float(torch.cat(v).sum()) if key.endswith("samples") else float(torch.cat(v).float().mean()))
            for key, v in sorted(hits.items())}


def allot(requests: Sequence[Request], count: int) -> list[int]:
    """Samples per request: each group's requests share `count` evenly (rounded up), so every figure rests on
    at least `count` samples."""
    sizes: dict[str, int] = {}
    for r in requests:
        sizes[r.group] = sizes.get(r.group, 0) + 1
    return [max(1, math.ceil(count / sizes[r.group])) for r in requests]


def sample_requests(model: nn.Module, requests: Sequence[Request], counts: Sequence[int], opt: Any,
                    progress: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """counts[i] samples (n_i, 3, H, W) of request i; sample j overall starts from noise seeded opt.seed + j
    (as scripts/sample.py); opt carries sampler, steps, eta, scale, seed, batch_size."""
    flat = [i for i, n in enumerate(counts) for _ in range(n)]
    out: list[list[torch.Tensor]] = [[] for _ in requests]
    for start in range(0, len(flat), opt.batch_size):
        chunk = flat[start:start + opt.batch_size]
        images = sample_batch(model, [requests[i].condition for i in chunk],
                              [opt.seed + start + j for j in range(len(chunk))], opt)
        for i, image in zip(chunk, images):
            out[i].append(image)
        if progress:
            progress(start + len(chunk))
    return [torch.stack(images) for images in out]

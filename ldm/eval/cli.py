"""`scripts/evaluate.py`: numbers with their protocol for a trained model, written to one JSON file.

    python scripts/evaluate.py --run logs/<run> --task reconstruction --out metrics.json
    python scripts/evaluate.py --config C.yaml --ckpt K.ckpt --task reconstruction --lpips random --fid none
    python scripts/evaluate.py --run logs/<ddpm run> --task generation --fid probe --n 1000 --floor --ceiling \
        data.params.validation.params.length=1000 --out fid.json
    python scripts/evaluate.py --run logs/<class run> --task conditional --n 200 --scale 3 --out probe.json
    python scripts/evaluate.py --run logs/<sr run> --task superres --n 200 --lpips random --fid none --out sr.json

tasks:
  reconstruction  autoencoders: PSNR, SSIM, LPIPS and rFID of the reconstructions of the config's data split,
                  beside bicubic down-and-up sampling by the autoencoder's factor on the same images
  generation      diffusion models: FID, KID (and IS when the extractor classifies) of --n samples, sample i
                  under the condition of reference image i; --floor: real images of the test split in the
                  samples' place; --ceiling: the model with an untrained denoiser
  superres        concat-conditioned super-resolution: Y-channel PSNR/SSIM (scale pixels cropped), LPIPS and
                  FID of the samples against the high-resolution images, beside bicubic up-sampling
  conditional     Shapes class / text / layout models: how often the Shapes probe reads what was asked
                  (ldm.eval.conditional), at least --n samples per figure
"""
import argparse
import json
import sys
from typing import Sequence

import torch
from omegaconf import OmegaConf

from ldm import sampling_cli, sampling_conditions
from ldm.eval import conditional, generation
from ldm.eval.features import build_feature_extractor
from ldm.eval.probe import ProbeAccuracyError, load_or_train_probe
from ldm.eval.protocol import EvalProtocol
from ldm.eval.reconstruction import BICUBIC, evaluate_reconstruction, image_batches
from ldm.losses.lpips import build_lpips
from ldm.diffusion.sampling import DISCRETE_SAMPLERS, SAMPLERS
from ldm.diffusion.sigma_schedules import SIGMA_SCHEDULES
from ldm.util import ConfigError, instantiate_from_config

TASKS = ("reconstruction", "generation", "superres", "conditional")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", allow_abbrev=False, description=__doc__.splitlines()[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run directory of main.py (its configs and checkpoints/last.ckpt, or --ckpt)")
    p.add_argument("--config", nargs="+", help="config YAML(s), merged left to right (with --ckpt)")
    p.add_argument("--ckpt", help="checkpoint file (.ckpt, .pt, .safetensors)")
    p.add_argument("--unsafe-pickle", action="store_true", help="allow arbitrary unpickling (trusted files only)")
    p.add_argument("--no-ema", action="store_true", help="the training weights instead of the EMA weights")
    p.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: the best available)")
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--out", required=True, help="JSON file to write (numbers and protocol)")
    p.add_argument("--split", default="validation", help="data section of the config to evaluate on")
    p.add_argument("--n", type=int, default=None,
                   help="images: at most this many (reconstruction; default the whole split), samples per figure "
                        "(default 200)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lpips", choices=("pretrained", "random", "none"), default="pretrained",
                   help="LPIPS VGG trunk: ImageNet weights (the metric), random ('lpips_random_trunk': "
                        "offline stand-in, not comparable with published LPIPS), or skip")
    p.add_argument("--fid", choices=("inception", "probe", "none"), default="inception",
                   help="FID/KID/IS feature extractor: torch-fidelity's Inception, or the Shapes probe (probe-FID)")
    p.add_argument("--inception-weights", help="pt_inception-2015-12-05 .pth file (torch-fidelity's FID weights)")
    p.add_argument("--seed", type=int, default=0, help="sample i starts from noise seeded with seed + i")
    g = p.add_argument_group("sampling (generation, superres, conditional)")
    g.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    g.add_argument("--schedule", choices=SIGMA_SCHEDULES, default=None,
                   help="sigma samplers' noise levels (default karras; ddpm/ddim/plms use their own timesteps)")
    g.add_argument("--steps", type=int, default=50, help="sampler steps (DDPM runs every timestep)")
    g.add_argument("--eta", type=float, default=None,
                   help="ddim (default 0), euler_a / dpmpp_2s_a / dpmpp_2m_sde (default 1) noise")
    g.add_argument("--scale", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    g.add_argument("--floor", action="store_true", help="generation: score real test-split images too")
    g.add_argument("--ceiling", action="store_true", help="generation: score the untrained denoiser too")
    g.add_argument("--probe-cache", help="directory of the cached Shapes probe (default $LDM_CACHE/probe)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    opt = parser.parse_args(argv)
    if bool(opt.run) == bool(opt.config) or (opt.config and not opt.ckpt):
        parser.error("give --run logs/<run>, or --config CONFIG.yaml --ckpt CHECKPOINT")
    if opt.n is not None and opt.n < 1:
        parser.error(f"--n must be positive, got {opt.n}")
    if opt.task != "reconstruction" and opt.sampler != "ddpm" and not 1 <= opt.steps <= 1000:
        parser.error(f"--steps must be in [1, 1000], got {opt.steps}")
    sampling_cli.check_sampling_options(parser, opt)
    return opt


def split_dataset(config, split: str, where: str):
    section = config.get("data", {}).get("params", {}).get(split)
    if section is None:
        raise ConfigError(f"{where}: no data.params.{split} section to evaluate on (choose one with --split)")
    return instantiate_from_config(section)


def run_reconstruction(opt: argparse.Namespace, loaded: sampling_cli.Loaded) -> EvalProtocol:
    model, device = loaded.model, next(loaded.model.parameters()).device
    if not hasattr(model, "reconstruct"):
        raise ConfigError(f"--task reconstruction needs an autoencoder; {type(model).__name__} is not one")
    dataset = split_dataset(loaded.config, opt.split, " + ".join(loaded.files))
    factor = model.encoder.downsampling_factor
    lpips_net, extractor = build_lpips_net(opt, device), build_extractor(opt, device)
    total = len(dataset) if opt.n is None else min(opt.n, len(dataset))
    results = evaluate_reconstruction(model, image_batches(dataset, opt.batch_size, opt.n), device, lpips_net,
                                      extractor, bicubic_factor=factor, progress=progress_printer(total))
    print(file=sys.stderr)
    metrics = flatten(results, opt)
    return EvalProtocol(num_samples=results["autoencoder"]["images"], sampler="reconstruction", steps=0, eta=0.0,
                        guidance_scale=1.0, seed=opt.seed, image_size=results["autoencoder"]["image_size"],
                        feature_extractor=getattr(extractor, "name", "none"),
                        feature_extractor_sha256=getattr(extractor, "weights_sha256", ""),
                        data_split=opt.split, dataset=type(dataset).__name__, checkpoint=loaded.ckpt,
                        metrics=metrics, notes=f"bicubic/*: {BICUBIC}, f={factor}; lpips trunk: {opt.lpips}")


# ---- shared parts ---------------------------------------------------------------------------------------------------
def build_lpips_net(opt: argparse.Namespace, device: torch.device) -> torch.nn.Module | None:
    torch.manual_seed(opt.seed)  # a random LPIPS trunk is the same in every evaluation with this seed
    return None if opt.lpips == "none" else build_lpips(opt.lpips == "pretrained").to(device)


def build_extractor(opt: argparse.Namespace, device: torch.device) -> torch.nn.Module | None:
    if opt.fid == "none":
        return None
    return build_feature_extractor(opt.fid, opt.inception_weights, cache_dir=opt.probe_cache).to(device)


def progress_printer(total: int):
    return lambda n: print(f"\r{n}/{total} images", end="", file=sys.stderr, flush=True)


def flatten(results: dict[str, dict[str, float]], opt: argparse.Namespace) -> dict[str, float]:
    """{arm: {metric: v}} -> {"arm/metric": v}; counts dropped, a random-trunk LPIPS renamed."""
    metrics = {}
    for arm, numbers in results.items():
        for key, value in numbers.items():
            if key in ("images", "image_size"):
                continue
            key = "lpips_random_trunk" if key == "lpips" and opt.lpips == "random" else key
            metrics[f"{arm}/{key}"] = value
    return metrics


def sampling_protocol(opt: argparse.Namespace, loaded: sampling_cli.Loaded, count: int, image_size: int,
                      extractor: torch.nn.Module | None, dataset: str, metrics: dict[str, float],
                      notes: str) -> EvalProtocol:
    steps = loaded.model.num_timesteps if opt.sampler == "ddpm" else opt.steps
    return EvalProtocol(num_samples=count, sampler=opt.sampler, steps=steps, eta=opt.eta, guidance_scale=opt.scale,
                        sigma_schedule="" if opt.sampler in DISCRETE_SAMPLERS else opt.schedule,
                        seed=opt.seed, image_size=image_size, feature_extractor=getattr(extractor, "name", "none"),
                        feature_extractor_sha256=getattr(extractor, "weights_sha256", ""), data_split=opt.split,
                        dataset=dataset, checkpoint=loaded.ckpt, metrics=metrics, notes=notes)


def other_split(config, split: str, where: str):
    """The evaluation split's dataset config with `split: test` (the FID floor's real images)."""
    section = config.get("data", {}).get("params", {}).get(split)
    if section is None or "split" not in (section.get("params") or {}):
        raise ConfigError(f"{where}: --floor needs data.params.{split} with a `split` parameter to swap for 'test'")
    floor = OmegaConf.to_container(section, resolve=True)
    floor["params"]["split"] = "test"
    return instantiate_from_config(floor)


# ---- sampling tasks -------------------------------------------------------------------------------------------------
def run_generation(opt: argparse.Namespace, loaded: sampling_cli.Loaded) -> EvalProtocol:
    model, where = loaded.model, " + ".join(loaded.files)
    if loaded.kind in ("image", "inpainting"):
        raise ConfigError(f"--task generation: {where} is {loaded.kind}-conditioned; use --task superres")
    dataset, count = split_dataset(loaded.config, opt.split, where), opt.n or 200
    extractor = build_extractor(opt, model.device)
    if extractor is None:
        raise ConfigError("--task generation needs a feature extractor: --fid inception or --fid probe")
    floor = other_split(loaded.config, opt.split, where) if opt.floor else None
    unet = OmegaConf.select(loaded.config, "model.params.unet_config")
    ceiling = generation.untrained_copy(model, unet, opt.seed) if opt.ceiling else None
    results = generation.evaluate_generation(model, dataset, count, opt, extractor, floor, ceiling,
                                             progress_printer(count))
    print(file=sys.stderr)
    notes = ("sample i under the condition of reference image i; floor/*: real images of the test split; "
             "ceiling/*: the denoiser re-initialised (seed --seed), first stage kept")
    return sampling_protocol(opt, loaded, count, image_side(model, dataset), extractor, type(dataset).__name__,
                             flatten(results, opt), notes)


def image_side(model: torch.nn.Module, dataset) -> int:
    return int(dataset[0][model.first_stage_key].shape[-1])


def run_superres(opt: argparse.Namespace, loaded: sampling_cli.Loaded) -> EvalProtocol:
    model, where = loaded.model, " + ".join(loaded.files)
    lr_key = getattr(model, "cond_stage_key", None)
    dataset, count = split_dataset(loaded.config, opt.split, where), opt.n or 200
    scale = getattr(dataset, "scale", None)
    if loaded.kind != "image" or scale is None or lr_key != getattr(dataset, "lr_key", None):
        raise ConfigError(f"--task superres: {where} is not a super-resolution model on a SuperResolution split "
                          f"(model condition {loaded.kind}, cond_stage_key {lr_key!r})")
    lpips_net, extractor = build_lpips_net(opt, model.device), build_extractor(opt, model.device)
    results = generation.evaluate_superres(model, dataset, count, opt, lr_key, scale, lpips_net, extractor,
                                           progress_printer(count))
    print(file=sys.stderr)
    notes = (f"x{scale}; psnr_y/ssim_y on BT.601 Y with {scale} border pixels cropped; bicubic/*: bicubic "
             f"up-sampling of the same LR images; lpips trunk: {opt.lpips}")
    return sampling_protocol(opt, loaded, count, image_side(model, dataset), extractor, type(dataset).__name__,
                             flatten(results, opt), notes)


def run_conditional(opt: argparse.Namespace, loaded: sampling_cli.Loaded) -> EvalProtocol:
    model, where, count = loaded.model, " + ".join(loaded.files), opt.n or 200
    if loaded.kind == "class":
        requests = conditional.class_requests(model)
    elif loaded.kind == "text":
        requests = conditional.text_requests(model, loaded.config)
    elif loaded.kind == "layout":
        requests = conditional.layout_requests(model, split_dataset(loaded.config, opt.split, where), count)
    else:
        raise ConfigError(f"--task conditional: {where} is {sampling_conditions.KINDS[loaded.kind][1]}; the probe "
                          f"checks class, text and layout models on Shapes")
    probe = load_or_train_probe(cache_dir=opt.probe_cache)
    counts = [1] * len(requests) if loaded.kind == "layout" else conditional.allot(requests, count)
    samples = conditional.sample_requests(model, requests, counts, opt, progress_printer(sum(counts)))
    print(file=sys.stderr)
    metrics = conditional.score_requests(probe.model, requests, samples)
    metrics |= {f"probe_heldout/{k}": v for k, v in probe.report.items()}
    notes = {"class": "each Shapes class in turn", "layout": f"the layouts of the first {count} {opt.split} images",
             "text": f"prompt {conditional.PROMPT!r} for every colour-shape pair"}[loaded.kind]
    return sampling_protocol(opt, loaded, sum(counts), int(samples[0].shape[-1]), None, "Shapes",
                             metrics, f"{notes}; verdicts of {probe.name} (sha256 {probe.sha256})")


RUNNERS = {"reconstruction": run_reconstruction, "generation": run_generation, "superres": run_superres,
           "conditional": run_conditional}


def main(argv: Sequence[str] | None = None) -> int:
    opt = parse_args(sys.argv[1:] if argv is None else list(argv))
    torch.manual_seed(opt.seed)
    try:
        loaded = sampling_cli.load(opt)
        record = RUNNERS[opt.task](opt, loaded)
    except (*sampling_cli.USER_ERRORS, ProbeAccuracyError) as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2
    path = record.save(opt.out)
    print(json.dumps(record.metrics, indent=1))
    print(f"evaluate.py: {record.num_samples} images; numbers and protocol in {path}")
    return 0

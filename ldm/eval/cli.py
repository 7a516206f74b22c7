"""`scripts/evaluate.py`: numbers with their protocol for a trained model, written to one JSON file.

    python scripts/evaluate.py --run logs/<run> --task reconstruction --out metrics.json
    python scripts/evaluate.py --config C.yaml --ckpt K.ckpt --task reconstruction --lpips random --fid none

reconstruction (autoencoders): PSNR, SSIM, LPIPS and rFID of the reconstructions of the config's data split,
beside bicubic down-and-up sampling by the autoencoder's factor on the same images.
"""
import argparse
import json
import sys
from typing import Sequence

import torch

from ldm import sampling_cli
from ldm.eval.features import build_feature_extractor
from ldm.eval.protocol import EvalProtocol
from ldm.eval.reconstruction import BICUBIC, evaluate_reconstruction, image_batches
from ldm.losses.lpips import build_lpips
from ldm.util import ConfigError, instantiate_from_config

TASKS = ("reconstruction",)


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
    p.add_argument("--n", type=int, default=None, help="at most this many images (default: the whole split)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lpips", choices=("pretrained", "random", "none"), default="pretrained",
                   help="LPIPS VGG trunk: ImageNet weights (the metric), random ('lpips_random_trunk': "
                        "offline stand-in, not comparable with published LPIPS), or skip")
    p.add_argument("--fid", choices=("inception", "none"), default="inception", help="rFID feature extractor")
    p.add_argument("--inception-weights", help="pt_inception-2015-12-05 .pth file (torch-fidelity's FID weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    opt = parser.parse_args(argv)
    if bool(opt.run) == bool(opt.config) or (opt.config and not opt.ckpt):
        parser.error("give --run logs/<run>, or --config CONFIG.yaml --ckpt CHECKPOINT")
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
    torch.manual_seed(opt.seed)  # a random LPIPS trunk is the same in every evaluation with this seed
    lpips_net = None if opt.lpips == "none" else build_lpips(opt.lpips == "pretrained").to(device)
    extractor = None if opt.fid == "none" else build_feature_extractor("inception", opt.inception_weights).to(device)
    total = len(dataset) if opt.n is None else min(opt.n, len(dataset))
    progress = lambda n: print(f"\r{n}/{total} images", end="", file=sys.stderr, flush=True)  # noqa: E731
    results = evaluate_reconstruction(model, image_batches(dataset, opt.batch_size, opt.n), device, lpips_net,
                                      extractor, bicubic_factor=factor, progress=progress)
    print(file=sys.stderr)
    if opt.lpips == "random":
        for numbers in results.values():
            numbers["lpips_random_trunk"] = numbers.pop("lpips")
    counts = ("images", "image_size")
    metrics = {f"{arm}/{k}": v for arm, numbers in results.items() for k, v in numbers.items() if k not in counts}
    return EvalProtocol(num_samples=results["autoencoder"]["images"], sampler="reconstruction", steps=0, eta=0.0,
                        guidance_scale=1.0, seed=opt.seed, image_size=results["autoencoder"]["image_size"],
                        feature_extractor=getattr(extractor, "name", "none"),
                        feature_extractor_sha256=getattr(extractor, "weights_sha256", ""),
                        data_split=opt.split, dataset=type(dataset).__name__, checkpoint=loaded.ckpt,
                        metrics=metrics, notes=f"bicubic/*: {BICUBIC}, f={factor}; lpips trunk: {opt.lpips}")


def main(argv: Sequence[str] | None = None) -> int:
    opt = parse_args(sys.argv[1:] if argv is None else list(argv))
    torch.manual_seed(opt.seed)
    try:
        loaded = sampling_cli.load(opt)
        record = run_reconstruction(opt, loaded)
    except sampling_cli.USER_ERRORS as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2
    path = record.save(opt.out)
    print(json.dumps(record.metrics, indent=1))
    print(f"evaluate.py: {record.num_samples} images; numbers and protocol in {path}")
    return 0

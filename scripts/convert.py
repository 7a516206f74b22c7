"""Convert checkpoints between ldm (CompVis layout), safetensors and diffusers: `python scripts/convert.py -h`.

    # SD 1.x checkpoint -> diffusers StableDiffusionPipeline folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/)
    python scripts/convert.py --to diffusers --config configs/compvis/v1-inference.yaml --ckpt model.ckpt --out sd/
    # diffusers pipeline folder -> our checkpoint (+ model.yaml beside it)
    python scripts/convert.py --to ldm --diffusers sd/ --out model.safetensors
    # first stage alone: kl-f8 checkpoint <-> diffusers AutoencoderKL folder (VQ: VQModel)
    python scripts/convert.py --to diffusers --config configs/compvis/kl-f8.yaml --ckpt kl-f8.ckpt --out kl-f8/
    python scripts/convert.py --to ldm --diffusers kl-f8/ --out kl-f8.ckpt
    # format only
    python scripts/convert.py --to safetensors --ckpt x.ckpt --out x.safetensors

Pickle files are read weights-only; a file that needs arbitrary unpickling is refused unless --unsafe-pickle.
Every file is written atomically. Bad input exits with status 2 and one message naming the file and key.
"""
import argparse
import sys
from typing import Sequence

from ldm.checkpoint import UNSAFE_PICKLE_FLAGS, CheckpointMismatchError, UnsafeCheckpointError
from ldm.convert.folders import DTYPES
from ldm.convert.keymap import ConversionError
from ldm.util import ConfigError

USER_ERRORS = (ConversionError, ConfigError, CheckpointMismatchError, UnsafeCheckpointError, FileNotFoundError,
               ValueError, KeyError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--to", required=True, choices=("diffusers", "ldm", "safetensors", "ckpt"),
                   help="diffusers: a diffusers folder from --config/--ckpt; ldm: our checkpoint from --diffusers; "
                        "safetensors / ckpt: the same weights in another file format")
    p.add_argument("--config", nargs="+", help="model config YAML(s), ours or CompVis/SD (with --to diffusers)")
    p.add_argument("--ckpt", help="our checkpoint (.ckpt, .pt, .safetensors)")
    p.add_argument("--diffusers", metavar="DIR", help="diffusers pipeline folder or one model folder (--to ldm)")
    p.add_argument("--out", required=True, help="output folder (--to diffusers) or file (.safetensors / .ckpt)")
    p.add_argument("--out-config", help="--to ldm: where the YAML config goes (default: --out with .yaml)")
    p.add_argument("--no-ema", action="store_true", help="use the training weights, not the file's EMA copies")
    p.add_argument("--clip", metavar="DIR", help="local CLIP text model folder (config.json, tokenizer) when the "
                                                 "config's `version` is not available offline")
    p.add_argument("--scaling-factor", type=float, help="first stage alone: diffusers scaling_factor "
                                                        "(default 0.18215 KL, 1.0 VQ)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point weights (default: as stored)")
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="allow arbitrary (code-executing) unpickling of --ckpt: only for files you trust")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    opt = parser.parse_args(argv)
    needs = {"diffusers": ("config", "ckpt"), "ldm": ("diffusers",), "safetensors": ("ckpt",), "ckpt": ("ckpt",)}
    missing = [f"--{name}" for name in needs[opt.to] if not getattr(opt, name)]
    if missing:
        parser.error(f"--to {opt.to} needs {' and '.join(missing)}")
    return opt


def run(opt: argparse.Namespace) -> list[str]:
    from ldm.convert import pipeline

    if opt.to == "diffusers":
        return pipeline.ldm_to_diffusers(opt.config, opt.ckpt, opt.out, use_ema=not opt.no_ema,
                                         allow_pickle=opt.unsafe_pickle, clip=opt.clip, dtype=opt.dtype,
                                         scaling_factor=opt.scaling_factor)
    if opt.to == "ldm":
        return pipeline.diffusers_to_ldm(opt.diffusers, opt.out, out_config=opt.out_config, dtype=opt.dtype,
                                         allow_pickle=opt.unsafe_pickle)
    if opt.out.endswith(".safetensors") != (opt.to == "safetensors"):
        raise ConversionError(f"--to {opt.to}: --out {opt.out!r} should end in "
                              f"{'.safetensors' if opt.to == 'safetensors' else '.ckpt or .pt'}")
    return pipeline.convert_format(opt.ckpt, opt.out, allow_pickle=opt.unsafe_pickle, dtype=opt.dtype)


def main(argv: Sequence[str] | None = None) -> int:
    opt = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        notes = run(opt)
    except UnsafeCheckpointError as err:
        print(f"convert.py: error: {err}".replace(UNSAFE_PICKLE_FLAGS, "--unsafe-pickle"), file=sys.stderr)
        return 2
    except USER_ERRORS as err:
        print(f"convert.py: error: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"convert.py: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

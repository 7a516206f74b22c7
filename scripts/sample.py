"""Sample images from a trained model: `python scripts/sample.py -h` lists the flags.

    python scripts/sample.py --run logs/<run> --n 8                               # unconditional
    python scripts/sample.py --run logs/<run> --class circle star --scale 3       # class-conditional
    python scripts/sample.py --run logs/<run> --prompt "a red circle" --prompt "a blue star" --scale 3
    python scripts/sample.py --config C.yaml --ckpt K.ckpt --image lr.png         # super-resolution
    python scripts/sample.py --run logs/<run> --image photo.png --mask mask.png   # inpainting, white = fill
    python scripts/sample.py --run logs/<run> --sampler dpmpp_2m --schedule karras --steps 20
    python scripts/sample.py --run logs/<run> --init-image photo.png --strength 0.6          # img2img, any model
    python scripts/sample.py --run logs/<run> --init-image photo.png --mask mask.png        # inpainting, any model

Writes <outdir>/<index>_<condition>.png, grid.png (one row per condition) and samples.json (each file with its
condition, seed and sampler settings). Inputs that do not fit the model exit with status 2 and one message.
"""
import sys
from typing import Sequence

import torch

from ldm import sampling_cli
from ldm.sampling_conditions import build_conditions


def main(argv: Sequence[str] | None = None) -> int:
    opt = sampling_cli.parse_args(sys.argv[1:] if argv is None else list(argv))
    torch.manual_seed(opt.seed)
    try:
        loaded = sampling_cli.load(opt)
        conditions = build_conditions(opt, loaded.model, loaded.kind, loaded.config)
        edit = sampling_cli.load_edit(opt, loaded.model, conditions)
        samples = sampling_cli.sample_all(loaded.model, conditions, opt, edit)
        entries = sampling_cli.write_outputs(opt.outdir, conditions, samples, sampling_cli.settings(opt, loaded))
    except sampling_cli.USER_ERRORS as err:
        print(f"sample.py: error: {err}", file=sys.stderr)
        return 2
    print(f"sample.py: {len(entries)} images, grid.png and samples.json in {opt.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quality against steps for each sampler on trained runs (`python scripts/sampler_sweep.py -h`).

    python scripts/sampler_sweep.py --run logs/<class run> --run logs/<text run> --run logs/<uncond run> \
        --samplers ddim euler heun dpmpp_2m unipc --steps 5 10 20 50 --n 200 --scale 3 --out docs/sampler_sweep \
        data.params.validation.params.length=200

Class / text / layout runs are scored as `scripts/evaluate.py --task conditional` scores them (the Shapes probe's
verdict), unconditional runs by probe-FID as `--task generation --fid probe`; the same seeds for every setting.
Writes results.json, results.md and results.png to --out; a rerun into the same folder reuses its figures.
"""
import sys

from ldm.eval.sweep import main

if __name__ == "__main__":
    sys.exit(main())

"""Train (or load) the cached Shapes probe and print its held-out accuracy.

    python scripts/train_probe.py [--cache-dir DIR] [--seed 0] [--epochs 8] [--train-length 20000] [--retrain]

The cache directory defaults to $LDM_CACHE/probe or ~/.cache/ldm/probe; the file name is keyed by
the settings, so a different seed or budget trains a new probe. Exits with status 1 when an
attribute is below the 98% bar (the probe's verdicts would not count).
"""
import argparse
import sys
import time
from dataclasses import fields

import torch

from ldm.eval.probe import ACCURACY_BAR, CHECKED, ProbeSettings, check_probe_accuracy, load_or_train_probe


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", default=None, help="overrides $LDM_CACHE/probe and ~/.cache/ldm/probe")
    parser.add_argument("--retrain", action="store_true", help="train even when a cached probe exists")
    parser.add_argument("--num-workers", type=int, default=2, help="processes rendering the training images")
    for f in fields(ProbeSettings):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = ProbeSettings(**{f.name: getattr(args, f.name) for f in fields(ProbeSettings)})
    start = time.perf_counter()
    probe = load_or_train_probe(settings, cache_dir=args.cache_dir, retrain=args.retrain, strict=False,
                                num_workers=args.num_workers)
    print(f"probe: {probe.path} (sha256 {probe.sha256}), torch threads {torch.get_num_threads()}, "
          f"{time.perf_counter() - start:.1f}s")
    print(f"held-out accuracy on {settings.val_length} Shapes validation images (bar {ACCURACY_BAR:.0%} on "
          f"{', '.join(CHECKED)}):")
    for name, value in probe.report.items():
        print(f"  {name:16s} {value:.4f}")
    return 0 if check_probe_accuracy(probe.report, strict=False) else 1


if __name__ == "__main__":
    sys.exit(main())

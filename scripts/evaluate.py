"""Evaluate a trained model; numbers and protocol go to one JSON file (`python scripts/evaluate.py -h`).

    python scripts/evaluate.py --run logs/<autoencoder run> --task reconstruction --out metrics.json
"""
import sys

from ldm.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())

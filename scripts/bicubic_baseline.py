"""Bicubic down-and-up sampling of the held-out Photos crops: the reference beside autoencoder figures.

    python scripts/bicubic_baseline.py --factor 4 --size 64     # same crops as kl/vq_f4_photos_tiny validation
"""
import argparse
import json

import torch

from ldm.data.photos import Photos
from ldm.eval.metrics import psnr, ssim
from ldm.eval.reconstruction import BICUBIC, bicubic_down_up


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    opt = p.parse_args(argv)
    data = Photos("validation", size=opt.size)
    x = torch.stack([data[i]["image"] for i in range(len(data))])                  # (N, 3, S, S) in [-1, 1]
    up = bicubic_down_up(x, opt.factor)
    result = {"crops": len(x), "size": opt.size, "factor": opt.factor, "method": BICUBIC,
              "psnr_mean_per_image": round(float(psnr(up, x).mean()), 3),
              "ssim_mean_per_image": round(float(ssim(up, x).mean()), 4)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""Training-step time of a tiny latent diffusion config with and without `first_stage_cache_size`.

    python bench/first_stage_cache.py [--config configs/diffusion/ldm_shapes_class_tiny.yaml] [--threads 1]

Times get_input (first-stage encoding) + loss + backward + AdamW over the same batches, alternately with the
cache bypassed and with every image already cached (an epoch after the first); medians over --rounds pairs.
The first stage has random weights (its cost does not depend on them), so no stage-one run is needed.
"""
import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from ldm.util import instantiate_from_config


def step_time(model, optimizer, batches) -> float:
    start = time.perf_counter()
    for batch in batches:
        x0, cond = model.get_input(batch)
        loss, _ = model.p_losses(x0, cond)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/diffusion/ldm_shapes_class_tiny.yaml")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="median over this many plain/cached pairs")
    opt = parser.parse_args()
    torch.set_num_threads(opt.threads)
    torch.manual_seed(0)
    cfg = OmegaConf.load(opt.config)
    cfg.model.params.first_stage_config.params.ckpt_path = None
    cfg.model.params.allow_random_first_stage = True
    model = instantiate_from_config(cfg.model).train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    data = instantiate_from_config(cfg.data.params.train)
    size = cfg.data.params.batch_size
    batches = [default_collate([data[i] for i in range(b * size, (b + 1) * size)]) for b in range(opt.batches)]
    model.first_stage_cache.size = len(batches) * size
    step_time(model, optimizer, batches)                                   # warm-up; fills the cache
    plain, cached = [], []
    for _ in range(opt.rounds):                                            # interleaved: drift hits both alike
        model.first_stage_cache.size = 0                                   # 0: the cache is bypassed
        plain.append(step_time(model, optimizer, batches))
        model.first_stage_cache.size = len(batches) * size
        cached.append(step_time(model, optimizer, batches))
    plain, cached = statistics.median(plain), statistics.median(cached)
    print(f"{opt.config}, batch {size}, {opt.threads} thread(s): {plain * 1e3:.0f} ms per step without the "
          f"cache, {cached * 1e3:.0f} ms with every image cached (x{plain / cached:.2f})")


if __name__ == "__main__":
    main()

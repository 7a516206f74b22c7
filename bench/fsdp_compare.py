"""The checks of bench/fsdp_gpu.sh on its runs' checkpoints: `python bench/fsdp_compare.py RUNS_FOLDER`."""
import glob
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ldm  # noqa: E402


def one(pattern: str) -> str:
    return sorted(glob.glob(os.path.join(sys.argv[1], pattern)))[0]


ddp = torch.load(one("*_ddp/checkpoints/last.ckpt"), weights_only=True)["state_dict"]
fsdp40 = torch.load(os.path.join(sys.argv[1], "fsdp_step40.ckpt"), weights_only=True)["state_dict"]
diff = {k: (ddp[k].float() - v.float()).abs().max().item() for k, v in fsdp40.items()}
worst = max(diff, key=diff.get)
print(f"DDP vs FSDP after 40 steps: {len(diff)} tensors (same keys: {set(ddp) == set(fsdp40)}), "
      f"max |difference| {diff[worst]:.2e} ({worst})")
last = torch.load(one("*_fsdp/checkpoints/last.ckpt"), weights_only=True)
print("after -r: global_step", last["global_step"], "optimizer step",
      float(last["optimizer_states"][0]["state"][0]["step"]), "EMA updates",
      int(last["state_dict"]["model_ema.num_updates"]))
model = ldm.load_model(one("*_fsdp/configs/*-project.yaml"), one("*_fsdp/checkpoints/last.ckpt"), device="cuda")
ema = last["state_dict"]["model_ema.diffusion_modelout2weight"]
print("load_model in one process, EMA weights are the file's:",
      torch.equal(model.model.diffusion_model.out[2].weight.cpu(), ema))
print("U-Net parameters:", sum(p.numel() for p in model.model.parameters()))

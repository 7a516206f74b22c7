"""Which integer timesteps: uniform sampling for training, the sub-sequences DDIM / PLMS visit."""
from typing import Optional

import torch
from torch import Tensor

DISCRETIZATIONS = ("uniform", "quad")


def sample_timesteps(batch: int, num_timesteps: int, device=None,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """t ~ Uniform{0, ..., num_timesteps - 1}, LongTensor [batch] on `device` (Algorithm 1, line 3)."""
    if batch < 1 or num_timesteps < 1:
        raise ValueError(f"sample_timesteps: batch ({batch}) and num_timesteps ({num_timesteps}) must be >= 1")
    draw_device = generator.device if generator is not None else device
    t = torch.randint(0, num_timesteps, (batch,), generator=generator, device=draw_device)
    return t.to(device) if device is not None else t


def ddim_timesteps(num_timesteps: int, steps: int, discretize: str = "uniform") -> Tensor:
    """Ascending LongTensor of the timesteps a `steps`-step DDIM / PLMS run visits.

    As CompVis: "uniform" takes every (T // steps)-th timestep, "quad" spaces them quadratically over
    [0, 0.8 T]; both shifted by +1. Unlike CompVis, "uniform" returns exactly `steps` values and
    "quad" drops duplicates (so it may return fewer when steps is close to T).
    """
    if discretize not in DISCRETIZATIONS:
        raise ValueError(f"ddim_timesteps: unknown discretize {discretize!r}; choose one of {DISCRETIZATIONS}")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"ddim_timesteps: steps must be in [1, {num_timesteps}] (num_timesteps), got {steps}")
    if discretize == "uniform":
        t = torch.arange(steps, dtype=torch.int64) * (num_timesteps // steps)
    else:
        t = (torch.linspace(0, (0.8 * num_timesteps) ** 0.5, steps, dtype=torch.float64) ** 2).long()
    return (t + 1).clamp(max=num_timesteps - 1).unique()  # sorted, distinct


def sampling_timesteps(num_timesteps: int, steps: int, discretize: str = "uniform",
                       start_t: Optional[int] = None) -> Tensor:
    """Descending timesteps to visit: `ddim_timesteps`, or for img2img `start_t` then those below it."""
    t = ddim_timesteps(num_timesteps, steps, discretize)
    if start_t is not None:
        if not 0 <= start_t < num_timesteps:
            raise ValueError(f"start_t must be in [0, {num_timesteps - 1}], got {start_t}")
        t = torch.cat([t[t < start_t], torch.tensor([start_t])])
    return t.flip(0)

"""Learning-rate factors as pure functions of the optimizer step: CompVis' `ldm.lr_scheduler` classes.

Each builder returns `f(step) -> float`, the factor a LambdaLR multiplies the base learning rate by (CompVis
passes `scheduler.schedule` to LambdaLR the same way). The parameter names are those of the original classes,
so their `scheduler_config.params` build these unchanged (through ldm.compat):

- LambdaWarmUpCosineScheduler  -> warmup_cosine_schedule: one warm-up, then a cosine decay that ends at
  max_decay_steps and stays at lr_min.
- LambdaWarmUpCosineScheduler2 -> cosine_cycle_schedule: cycles, each a linear warm-up then a cosine decay.
- LambdaLinearScheduler        -> linear_cycle_schedule: cycles, each a linear warm-up then a linear decay.

Cycles follow CompVis: cycle i covers the steps up to and including the sum of the first i + 1
cycle_lengths, counted from the previous cycles' sum; steps past the last cycle stay at its end.
`verbosity_interval` (CompVis printed the factor every so many steps) is accepted and has no effect.
"""
import math
from typing import Callable, Sequence

from ldm.util import ConfigError

Schedule = Callable[[int], float]


def warmup_cosine_schedule(warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float,
                           max_decay_steps: int, verbosity_interval: int = 0) -> Schedule:
    """lr_start -> lr_max linearly over warm_up_steps, then lr_min + (lr_max - lr_min)(1 + cos(pi t)) / 2 with
    t = (step - warm_up_steps) / (max_decay_steps - warm_up_steps), clipped to 1."""
    if not 0 <= warm_up_steps < max_decay_steps:
        raise ConfigError(f"scheduler_config.params: need 0 <= warm_up_steps ({warm_up_steps}) < max_decay_steps "
                          f"({max_decay_steps})")

    def factor(step: int) -> float:
        if step < warm_up_steps:
            return lr_start + (lr_max - lr_start) * step / warm_up_steps
        t = min((step - warm_up_steps) / (max_decay_steps - warm_up_steps), 1.0)
        return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + math.cos(t * math.pi))

    return factor


def _check_cycles(warm_up_steps: Sequence[int], f_start: Sequence[float], f_max: Sequence[float],
                  f_min: Sequence[float], cycle_lengths: Sequence[int]) -> None:
    lists = dict(warm_up_steps=warm_up_steps, f_start=f_start, f_max=f_max, f_min=f_min, cycle_lengths=cycle_lengths)
    if len({len(v) for v in lists.values()}) != 1 or not cycle_lengths:
        raise ConfigError(f"scheduler_config.params: {sorted(lists)} need one entry per cycle, "
                          f"got {({k: len(v) for k, v in lists.items()})}")
    if any(length <= 0 for length in cycle_lengths):
        raise ConfigError(f"scheduler_config.params.cycle_lengths must be positive, got {list(cycle_lengths)}")


def cycle_position(step: int, cycle_lengths: Sequence[int]) -> tuple[int, int]:
    """(cycle index, step within it), CompVis' convention: a cycle's end step still belongs to it."""
    end = 0
    for i, length in enumerate(cycle_lengths):
        if step <= end + length:
            return i, max(step - end, 0)
        end += length
    return len(cycle_lengths) - 1, cycle_lengths[-1]


def cosine_cycle_schedule(warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                          f_start: Sequence[float], cycle_lengths: Sequence[int],
                          verbosity_interval: int = 0) -> Schedule:
    """Per cycle: f_start -> f_max linearly over warm_up_steps, then a cosine from f_max down to f_min, reached
    at the cycle's end."""
    _check_cycles(warm_up_steps, f_start, f_max, f_min, cycle_lengths)

    def factor(step: int) -> float:
        i, n = cycle_position(step, cycle_lengths)
        if n < warm_up_steps[i]:
            return f_start[i] + (f_max[i] - f_start[i]) * n / warm_up_steps[i]
        t = min((n - warm_up_steps[i]) / max(cycle_lengths[i] - warm_up_steps[i], 1), 1.0)
        return f_min[i] + 0.5 * (f_max[i] - f_min[i]) * (1.0 + math.cos(t * math.pi))

    return factor


def linear_cycle_schedule(warm_up_steps: Sequence[int], f_start: Sequence[float], f_max: Sequence[float],
                          f_min: Sequence[float], cycle_lengths: Sequence[int],
                          verbosity_interval: int = 0) -> Schedule:
    """Per cycle: f_start -> f_max linearly over warm_up_steps, then linearly from f_max towards f_min, reaching
    it at the cycle's end."""
    _check_cycles(warm_up_steps, f_start, f_max, f_min, cycle_lengths)

    def factor(step: int) -> float:
        i, n = cycle_position(step, cycle_lengths)
        if n < warm_up_steps[i]:
            return f_start[i] + (f_max[i] - f_start[i]) * n / warm_up_steps[i]
        return f_min[i] + (f_max[i] - f_min[i]) * (cycle_lengths[i] - n) / cycle_lengths[i]

    return factor


# CompVis class name -> builder (lr_schedule_from_config reads these from any package path)
COMPVIS_SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "LambdaWarmUpCosineScheduler": warmup_cosine_schedule,
    "LambdaWarmUpCosineScheduler2": cosine_cycle_schedule,
    "LambdaLinearScheduler": linear_cycle_schedule,
}

"""What the network predicts ("eps", "x0" or "v"): its training target and conversion to (eps, x0)."""
from typing import Tuple

from torch import Tensor

from ldm.diffusion import gaussian
from ldm.diffusion.schedules import DiffusionSchedule

PARAMETERIZATIONS = ("eps", "x0", "v")


def check_parameterization(parameterization: str) -> str:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization {parameterization!r} is not supported; "
                         f"choose one of {PARAMETERIZATIONS}")
    return parameterization


def target_for(parameterization: str, x0: Tensor, noise: Tensor, t: Tensor,
               schedule: DiffusionSchedule) -> Tensor:
    """The regression target of the network for x_t = q_sample(x0, t, noise)."""
    check_parameterization(parameterization)
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    return gaussian.get_v(x0, noise, t, schedule)


def to_eps_x0(parameterization: str, output: Tensor, x_t: Tensor, t: Tensor,
              schedule: DiffusionSchedule) -> Tuple[Tensor, Tensor]:
    """(eps, x0) implied by the network output at (x_t, t)."""
    check_parameterization(parameterization)
    if output.shape != x_t.shape:
        raise ValueError(f"to_eps_x0: model output shape {tuple(output.shape)} differs from "
                         f"x_t shape {tuple(x_t.shape)}")
    if parameterization == "eps":
        return output, gaussian.predict_x0_from_eps(x_t, t, output, schedule)
    if parameterization == "x0":
        return gaussian.predict_eps_from_x0(x_t, t, output, schedule), output
    return (gaussian.predict_eps_from_v(x_t, t, output, schedule),
            gaussian.predict_x0_from_v(x_t, t, output, schedule))

"""CompVis' LR schedulers as pure functions of the step (ldm.lr_schedules): closed forms, cycle boundaries, and the
published inpainting_big scheduler_config driving a model's LambdaLR."""
import math
import pathlib

import pytest
import torch
from omegaconf import OmegaConf

from ldm.lr_schedules import cosine_cycle_schedule, cycle_position, linear_cycle_schedule, warmup_cosine_schedule
from ldm.models.ddpm import lr_schedule_from_config
from ldm.util import ConfigError, instantiate_from_config

INPAINTING = pathlib.Path(__file__).parent / "data/compvis/latent-diffusion/models/ldm/inpainting_big/config.yaml"


def test_warmup_cosine_closed_form():
    """LambdaWarmUpCosineScheduler with inpainting_big's numbers: linear warm-up, cosine to lr_min, then flat."""
    f = warmup_cosine_schedule(warm_up_steps=1000, lr_min=1e-4, lr_max=0.1, lr_start=1e-3, max_decay_steps=50000)
    assert f(0) == pytest.approx(1e-3) and f(500) == pytest.approx(0.0505) and f(1000) == pytest.approx(0.1)
    assert f(25500) == pytest.approx(1e-4 + 0.5 * (0.1 - 1e-4))               # half-way: cos(pi/2) = 0
    assert f(13250) == pytest.approx(1e-4 + 0.5 * (0.1 - 1e-4) * (1 + math.cos(math.pi / 4)))
    assert f(50000) == pytest.approx(1e-4) and f(10 ** 7) == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="max_decay_steps"):
        warmup_cosine_schedule(warm_up_steps=10, lr_min=0, lr_max=1, lr_start=0, max_decay_steps=10)


def test_cycles_keep_their_end_step_as_in_compvis():
    assert [cycle_position(s, [4, 6]) for s in (0, 3, 4, 5, 10, 11, 99)] == [
        (0, 0), (0, 3), (0, 4), (1, 1), (1, 6), (1, 6), (1, 6)]               # past the last cycle: its end


def test_cosine_cycles_closed_form():
    """LambdaWarmUpCosineScheduler2: per cycle a linear warm-up, then a half cosine from f_max to f_min."""
    f = cosine_cycle_schedule(warm_up_steps=[2, 2], f_min=[0.0, 0.5], f_max=[1.0, 1.0], f_start=[0.0, 0.0],
                              cycle_lengths=[4, 6])
    assert [f(s) for s in range(12)] == pytest.approx([0, 0.5, 1, 0.5, 0, 0.5, 1, 0.5 + 0.25 * (1 + 2 ** -0.5),
                                                       0.75, 0.5 + 0.25 * (1 - 2 ** -0.5), 0.5, 0.5])
    with pytest.raises(ConfigError, match="one entry per cycle"):
        cosine_cycle_schedule([2], [0.0], [1.0], [0.0, 0.0], [4])
    with pytest.raises(ConfigError, match="cycle_lengths must be positive"):
        linear_cycle_schedule([0], [0.0], [1.0], [0.0], [0])


def test_linear_cycles_closed_form():
    f = linear_cycle_schedule(warm_up_steps=[10], f_start=[1e-6], f_max=[1.0], f_min=[0.5], cycle_lengths=[100])
    assert [f(s) for s in (0, 5, 10, 55, 100, 500)] == pytest.approx([1e-6, 0.5, 0.95, 0.725, 0.5, 0.5], abs=1e-6)


def test_original_targets_build_the_schedules_in_a_model():
    """The published inpainting_big scheduler_config, read by the model: its LambdaLR follows the closed form."""
    config = OmegaConf.to_container(OmegaConf.load(INPAINTING).model.params.scheduler_config)
    reference = warmup_cosine_schedule(**config["params"])
    by_target = instantiate_from_config(config)                              # the alias table
    by_model = lr_schedule_from_config(config)                               # DDPM / LatentDiffusion
    assert [by_target(s) for s in (0, 999, 30000)] == [reference(s) for s in (0, 999, 30000)]
    assert [by_model(s) for s in (0, 999, 30000)] == [reference(s) for s in (0, 999, 30000)]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=by_model)
    for _ in range(3):
        opt.step(), sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6 * reference(3))
    second = instantiate_from_config({"target": "ldm.lr_scheduler.LambdaWarmUpCosineScheduler2", "params": {
        "warm_up_steps": [1], "f_min": [0.1], "f_max": [1.0], "f_start": [0.0], "cycle_lengths": [3],
        "verbosity_interval": 0}})
    assert [second(s) for s in range(4)] == pytest.approx([0.0, 1.0, 0.55, 0.1])
    with pytest.raises(ConfigError, match=r"lr_mn \(did you mean 'lr_min'"):
        lr_schedule_from_config({"target": "ldm.lr_scheduler.LambdaWarmUpCosineScheduler",
                                 "params": {**config["params"], "lr_mn": 1}})

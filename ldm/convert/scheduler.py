"""Our diffusion schedule params (DDPM / LatentDiffusion) <-> a diffusers scheduler config.

CompVis "linear" (linspace of square roots, squared) is diffusers' "scaled_linear"; "sqrt_linear" is "linear";
"cosine" with cosine_s 0.008 is "squaredcos_cap_v2". Any other schedule travels as explicit betas
(`trained_betas` / `given_betas`).
"""
from typing import Any, Mapping

from ldm.convert.keymap import ConversionError
from ldm.diffusion.schedules import make_beta_schedule

_TO_THEIRS = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}
_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# per scheduler class, the settings of the published pipelines (SD 1.x: PNDM; LDM: DDIM; DDPM: DDPM)
SCHEDULER_DEFAULTS = {
    "PNDMScheduler": {"skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False},
    "DDIMScheduler": {"steps_offset": 0, "set_alpha_to_one": True, "clip_sample": False},
    "DDPMScheduler": {"clip_sample": True, "variance_type": "fixed_small"},
}


def to_diffusers_scheduler(params: Mapping[str, Any], class_name: str = "PNDMScheduler") -> dict[str, Any]:
    """Scheduler config of our model params (timesteps, beta_schedule, linear_start/end, cosine_s, given_betas,
    parameterization)."""
    timesteps = params.get("timesteps", 1000)
    schedule = params.get("beta_schedule", "linear")
    start, end = params.get("linear_start", 1e-4), params.get("linear_end", 2e-2)
    config: dict[str, Any] = {"_class_name": class_name, "num_train_timesteps": timesteps,
                              "beta_start": start, "beta_end": end,
                              "prediction_type": _PREDICTION[params.get("parameterization", "eps")],
                              **SCHEDULER_DEFAULTS.get(class_name, {})}
    betas = params.get("given_betas")
    if betas is None and (schedule not in _TO_THEIRS or (schedule == "cosine" and params.get("cosine_s", 8e-3) != 8e-3)):
        betas = make_beta_schedule(schedule, timesteps, start, end, params.get("cosine_s", 8e-3)).tolist()
    if betas is not None:
        config.update(beta_schedule="linear", trained_betas=list(map(float, betas)))
    else:
        config.update(beta_schedule=_TO_THEIRS[schedule], trained_betas=None)
    return config


def from_diffusers_scheduler(config: Mapping[str, Any], source: str = "scheduler_config.json") -> dict[str, Any]:
    """Our schedule params of a diffusers scheduler config."""
    prediction = {v: k for k, v in _PREDICTION.items()}
    kind = config.get("prediction_type", "epsilon")
    if kind not in prediction:
        raise ConversionError(f"{source}: prediction_type {kind!r} is not supported (epsilon, v_prediction, sample)")
    params = {"timesteps": config.get("num_train_timesteps", 1000), "linear_start": config.get("beta_start", 1e-4),
              "linear_end": config.get("beta_end", 2e-2), "parameterization": prediction[kind]}
    if config.get("trained_betas") is not None:
        params["given_betas"] = list(config["trained_betas"])
        return params
    ours = {v: k for k, v in _TO_THEIRS.items()}
    schedule = config.get("beta_schedule", "linear")
    if schedule not in ours:
        raise ConversionError(f"{source}: beta_schedule {schedule!r} is not supported ({sorted(ours)})")
    params["beta_schedule"] = ours[schedule]
    return params

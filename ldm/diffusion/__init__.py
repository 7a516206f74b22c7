"""Diffusion math as pure functions: schedules, the Gaussian forward process and its posterior,
eps / x0 / v parameterisations, the training loss, timesteps, classifier-free guidance, the continuous sigma
interface and its schedules, samplers (`run_sampler` dispatches to all of them), img2img and inpainting.
Nothing here owns a network or imports Lightning."""
from ldm.diffusion.denoiser import DiscreteDenoiser
from ldm.diffusion.gaussian import (extract, get_v, predict_eps_from_v, predict_eps_from_x0,
                                    predict_x0_from_eps, predict_x0_from_v, q_posterior, q_sample)
from ldm.diffusion.guidance import CFGDenoiser
from ldm.diffusion.losses import diffusion_loss, lvlb_weights, training_loss
from ldm.diffusion.parameterization import PARAMETERIZATIONS, target_for, to_eps_x0
from ldm.diffusion.samplers import sample_ddim, sample_ddpm, sample_plms
from ldm.diffusion.sampling import SAMPLERS, run_sampler
from ldm.diffusion.schedules import (BUFFER_NAMES, DiffusionSchedule, make_beta_schedule, make_schedule,
                                     schedule_buffers)
from ldm.diffusion.sigma_schedules import SIGMA_SCHEDULES, exponential_sigmas, karras_sigmas, make_sigmas
from ldm.diffusion.timesteps import ddim_timesteps, sample_timesteps, sampling_timesteps

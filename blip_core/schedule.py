"""SD 1.5's noise schedule, the one BLIP-Diffusion was trained, sampled and fine-tuned with.

``scaled_linear`` betas 0.00085 -> 0.012 over 1000 training timesteps (diffusers' PNDMScheduler
and DDPMScheduler configs of the release), latents scaled by 0.18215. The PNDM sampler, the
fine-tune's DDPM targets and the host's sigmas all read this one table. Plain torch.
"""
from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
LATENT_SCALE = 0.18215  # SD 1.x VAE latents -> the UNet's scale


def alphas_cumprod(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START,
                   beta_end: float = BETA_END, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """alpha_bar[t] for the scaled_linear schedule; in float32, bit-equal to diffusers' table."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=dtype) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def leading_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The distinct timesteps of "leading" spacing, noisiest first (25 steps: 960, 920, ..., 0)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    ratio = num_train_timesteps // steps
    return [i * ratio for i in reversed(range(steps))]


# Below this first timestep a render that starts from pure noise comes out noisy: the noise it
# starts from belongs to a noisier timestep than the one the sampler treats it as. Under 10 steps
# the first timestep is low by the spacing itself (2 steps: 500), as published, and allowed.
LEAST_FIRST_TIMESTEP = 850


def start_problem(first_timestep: int, steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> str | None:
    """Why ``steps`` steps from ``first_timestep`` cannot start from pure noise, or None if they can."""
    if steps < 10 or first_timestep >= LEAST_FIRST_TIMESTEP:
        return None
    return (f"{steps} steps starting at timestep {first_timestep} of {num_train_timesteps} cannot start from pure "
            "noise: the picture would come out noisy")


def steps_problem(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> str | None:
    """Why ``steps`` of leading spacing cannot sample from pure noise (with the fix), or None if they can.

    ``num_train_timesteps // steps`` floors, so some step counts start far below the top of the
    schedule (334 steps: 666; 400: 798; 600: 599) while fewer steps start near it (333: 996).
    """
    if steps < 2:
        return f"{steps} step samples nothing (its only timestep is 0): use at least 2 (published: 25 to 100)"
    first = leading_timesteps(steps, num_train_timesteps)[0]
    problem = start_problem(first, steps, num_train_timesteps)
    if problem is None:
        return None
    return (f"{problem} (the published spacing {num_train_timesteps} // {steps} = {num_train_timesteps // steps} "
            f"floors): use {fewer_steps(steps, num_train_timesteps)} steps instead (published: 25 to 100)")


def fewer_steps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> int:
    """The most steps under ``steps`` whose leading spacing starts from pure noise (the refused counts
    come in bands: 167-170, 201-213, 251-284, 334-425, 501-850 of 1000; under 10 none is refused)."""
    return next((n for n in range(steps - 1, 9, -1)
                 if start_problem(leading_timesteps(n, num_train_timesteps)[0], n, num_train_timesteps) is None), 9)


def sigma_to_alpha(sigma: float) -> float:
    """alpha_bar of a k-diffusion sigma (sigma^2 = (1 - alpha_bar) / alpha_bar)."""
    return 1.0 / (1.0 + sigma * sigma)

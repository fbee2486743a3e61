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


def sigma_to_alpha(sigma: float) -> float:
    """alpha_bar of a k-diffusion sigma (sigma^2 = (1 - alpha_bar) / alpha_bar)."""
    return 1.0 / (1.0 + sigma * sigma)

"""The published sampler: PNDM's PLMS as diffusers' PNDMScheduler runs it for BLIP-Diffusion.

Settings fixed by the release: skip_prk_steps=True, set_alpha_to_one=False, steps_offset 0,
"leading" spacing, scaled_linear betas 0.00085 -> 0.012 over 1000 (blip_core/schedule.py),
epsilon prediction.

Two views of the same loop:
- ``sample_plms``: diffusers' view, integer timesteps and an alpha_bar table.
- ``sample_plms_sigmas``: the k-diffusion view used by ComfyUI, where x lives in the
  variance-exploding scale x_ve = x0 + sigma * eps and the model returns x0.
Plain torch; no ComfyUI import.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .schedule import NUM_TRAIN_TIMESTEPS, leading_timesteps, sigma_to_alpha

# Adams-Bashforth weights, newest epsilon first (PNDM paper, eq. 12 and its warm-up orders).
_AB_WEIGHTS = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def pndm_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """diffusers' timestep list for skip_prk_steps: the second timestep repeats (PLMS warm-up),
    so N steps are N+1 model calls (25 steps: 960, 920, 920, 880, ..., 0)."""
    ts = leading_timesteps(steps, num_train_timesteps)
    return ts[:2] + ts[1:]


def plms_step(x: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float) -> torch.Tensor:
    """Move x from alpha_bar a_t to a_prev along eps (PNDM eq. 9, diffusers' _get_prev_sample).

    Algebraically the DDIM step; this form avoids the cancellation of
    sqrt(1-a_prev) - sqrt(a_prev (1-a_t) / a_t) near a_prev ~ a_t.
    """
    if a_prev == a_t:
        return x
    denom = a_t * math.sqrt(1.0 - a_prev) + math.sqrt(a_t * (1.0 - a_t) * a_prev)
    return math.sqrt(a_prev / a_t) * x - ((a_prev - a_t) / denom) * eps


def _combine(history: Sequence[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of up to four epsilons (history oldest first)."""
    weights = _AB_WEIGHTS[len(history) - 1]
    out = weights[0] * history[-1]
    for w, e in zip(weights[1:], reversed(history[:-1])):
        out = out + w * e
    return out


def plms_loop(eps_fn: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor,
              alpha_bars: Sequence[float],
              callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """PLMS through points 0..n with alpha_bar ``alpha_bars[i]``, stepping i -> i+1.

    ``eps_fn(x, i)`` is the model's epsilon at point i for x in the diffusers
    (variance-preserving) scale. The first step is taken twice: an Euler step gives a
    probe at point 1, then the step restarts from point 0 with the mean of both
    epsilons (the probe's epsilon is not kept in the history). A last step that does not
    move alpha_bar (diffusers' call at t=0 with set_alpha_to_one=False) is skipped.
    ``callback(i, x)`` runs after step i.
    """
    n = len(alpha_bars) - 1
    history: list[torch.Tensor] = []
    for i in range(n):
        a_t, a_next = float(alpha_bars[i]), float(alpha_bars[i + 1])
        if i == n - 1 and a_next == a_t:
            pass  # the step is the identity whatever eps is: no model call
        elif i == 0:
            eps = eps_fn(x, 0)
            probe = plms_step(x, eps, a_t, a_next)
            history.append(eps)
            x = plms_step(x, (eps + eps_fn(probe, 1)) / 2, a_t, a_next)
        else:
            history = (history + [eps_fn(x, i)])[-4:]
            x = plms_step(x, _combine(history), a_t, a_next)
        if callback is not None:
            callback(i, x)
    return x


def sample_plms(eps_fn: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor,
                timesteps: Sequence[int], alphas_cumprod: torch.Tensor,
                final_alpha_cumprod: float | None = None,
                callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """The diffusers loop: ``timesteps`` as from ``pndm_timesteps`` (with the repeat),
    ``eps_fn(x, t)`` for integer t. The step after the last timestep goes to
    ``final_alpha_cumprod``, by default alpha_bar[0] (set_alpha_to_one=False)."""
    ts = list(timesteps)
    if len(ts) > 2:
        ts = ts[:2] + ts[3:]  # the repeat is the warm-up probe, which plms_loop makes itself
    final = float(alphas_cumprod[0]) if final_alpha_cumprod is None else float(final_alpha_cumprod)
    alpha_bars = [float(alphas_cumprod[t]) for t in ts] + [final]
    return plms_loop(lambda xx, i: eps_fn(xx, ts[i]), x, alpha_bars, callback)


def sample_plms_sigmas(denoise_fn: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor,
                       sigmas: Sequence[float], final_sigma: float,
                       callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
                       ) -> torch.Tensor:
    """PLMS in the k-diffusion convention.

    ``x`` is at ``sigmas[0]`` in the variance-exploding scale (x0 + sigma * eps);
    ``denoise_fn(x_ve, sigma)`` returns the x0 prediction. A trailing sigma of 0 stands
    for diffusers' final step, which ends at ``final_sigma`` (the model's sigma at t=0,
    set_alpha_to_one=False), not at the clean image: the result is then diffusers' final
    latent as is. Otherwise the result is returned in the VE scale at ``sigmas[-1]`` so
    another sampler can continue from it. ``callback(i, x_ve, denoised)`` runs per step.
    """
    # one transfer for a device tensor (not one synchronisation per sigma); floats either way
    sig = sigmas.tolist() if isinstance(sigmas, torch.Tensor) else [float(s) for s in sigmas]
    last = sig[-1] if sig else 0.0
    if len(sig) < 2:
        return x
    if sig[-1] == 0.0:
        sig[-1] = float(final_sigma)
    alpha_bars = [sigma_to_alpha(s) for s in sig]
    last_denoised = [None]

    def eps_fn(x_vp: torch.Tensor, i: int) -> torch.Tensor:
        x_ve = x_vp * math.sqrt(1.0 + sig[i] ** 2)
        denoised = denoise_fn(x_ve, sig[i])
        last_denoised[0] = denoised
        return (x_ve - denoised) / sig[i]

    def on_step(i: int, x_vp: torch.Tensor) -> None:
        if callback is not None:
            x_ve = x_vp * math.sqrt(1.0 + sig[i + 1] ** 2)
            callback(i, x_ve, x_ve if last_denoised[0] is None else last_denoised[0])

    x_vp = plms_loop(eps_fn, x / math.sqrt(1.0 + sig[0] ** 2), alpha_bars, on_step)
    return x_vp * math.sqrt(1.0 + last ** 2)

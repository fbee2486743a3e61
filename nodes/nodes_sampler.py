"""The published sampler (diffusers' PNDM/PLMS) as a host SAMPLER plus its SIGMAS.

Use both with SamplerCustom / SamplerCustomAdvanced: BlipPNDMScheduler gives the exact
published timesteps, BlipPNDMSampler runs PLMS on them. The math is in blip_core.pndm.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

import comfy.model_sampling
import comfy.samplers
from comfy_api.latest import io

from ..blip_core import pndm, schedule


def sample_blip_pndm(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """k-diffusion style sampler function: ``model(x, sigma * s_in)`` returns x0."""
    extra_args = {} if extra_args is None else extra_args
    model_sampling = model.inner_model.model_patcher.get_model_object("model_sampling")
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        raise ValueError("BLIP-Diffusion PNDM Sampler needs a noise-prediction (SD 1.x style) model, but the "
                         f"connected model samples as a flow model ({type(model_sampling).__name__}): connect the "
                         "BLIP-Diffusion UNet without flow patches such as ModelSamplingSD3/ModelSamplingFlux, or "
                         "use another sampler")
    s_in = x.new_ones([x.shape[0]])
    pbar = tqdm(total=len(sigmas) - 1, disable=disable)

    def on_step(i, x_ve, denoised):
        pbar.update(1)
        if callback is not None:
            callback({"x": x_ve, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})

    try:
        # A trailing 0 ends at the model's sigma at t=0: diffusers' set_alpha_to_one=False.
        return pndm.sample_plms_sigmas(lambda xx, s: model(xx, s * s_in, **extra_args), x, sigmas,
                                       final_sigma=float(model_sampling.sigma_min), callback=on_step)
    finally:
        pbar.close()


class PNDMKSampler(comfy.samplers.KSAMPLER):
    """KSAMPLER that can declare full denoising whatever the first sigma is.

    The host scales the initial noise by sqrt(1 + sigma^2) (pure noise) only when sigmas[0]
    is the model's sigma_max; the published schedule starts lower (t=960 for 25 steps) yet
    diffusers starts from unit-variance noise there.
    """

    def __init__(self, full_denoise: bool = True):
        super().__init__(sample_blip_pndm)
        self.full_denoise = full_denoise

    def max_denoise(self, model_wrap, sigmas):
        return self.full_denoise or super().max_denoise(model_wrap, sigmas)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, *args, **kwargs):
        problem = self.start_problem(model_wrap.inner_model.model_sampling, sigmas, noise)
        if problem:
            raise ValueError(f"BLIP-Diffusion PNDM Sampler: {problem}")
        return super().sample(model_wrap, sigmas, extra_args, callback, noise, *args, **kwargs)

    def start_problem(self, model_sampling, sigmas, noise) -> str | None:
        """Why pure noise cannot start at ``sigmas[0]`` (full_denoise with noise added), or None."""
        discrete = type(model_sampling).timestep is comfy.model_sampling.ModelSamplingDiscrete.timestep
        if not (self.full_denoise and discrete and len(sigmas) > 1 and noise.abs().max() > 0):
            return None   # no noise added (add_noise off): the start is the latent, whatever the scaling
        steps, table = len(sigmas) - 1, len(model_sampling.sigmas)
        first = round(float(model_sampling.timestep(sigmas[0].reshape(1)).item()))
        problem = schedule.start_problem(first, steps, table)
        if problem is None:
            return None
        if first == schedule.leading_timesteps(steps, table)[0]:   # BLIP-Diffusion PNDM Scheduler's sigmas
            return f"{schedule.steps_problem(steps, table)}; or turn full_denoise off for image-to-image"
        return f"{problem}: turn full_denoise off for split sigmas, denoise below 1 or image-to-image"


class BlipPNDMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipPNDMSampler",
            display_name="BLIP-Diffusion PNDM Sampler",
            category="blip_diffusion/sampling",
            description="The sampler BLIP-Diffusion was published with: diffusers' PNDMScheduler in PLMS "
                        "mode (skip_prk_steps, set_alpha_to_one=False). Pair it with BLIP-Diffusion PNDM "
                        "Scheduler in SamplerCustom to reproduce diffusers' pipeline.",
            inputs=[
                io.Boolean.Input("full_denoise", default=True,
                                 tooltip="On: start from pure noise at the first sigma, as diffusers does for "
                                         "text-to-image although its first timestep (960 for 25 steps) is below "
                                         "the model's maximum. Off: the host's rule (pure noise only at the "
                                         "model's maximum sigma, else noise added to the input latent), for "
                                         "image-to-image or split sigmas."),
            ],
            outputs=[io.Sampler.Output(tooltip="The published PLMS sampler, for SamplerCustom.")],
        )

    @classmethod
    def execute(cls, full_denoise=True) -> io.NodeOutput:
        return io.NodeOutput(PNDMKSampler(full_denoise))


class BlipPNDMScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipPNDMScheduler",
            display_name="BLIP-Diffusion PNDM Scheduler",
            category="blip_diffusion/sampling",
            description="The published timesteps (diffusers' \"leading\" spacing: 25 steps give 960, 920, ..., 0) "
                        "as the model's exact sigmas, then 0 for the final step. Feed BLIP-Diffusion PNDM Sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model whose noise schedule gives the sigmas."),
                io.Int.Input("steps", default=25, min=2, max=1000,
                             tooltip="Sampling steps. The paper used 100, diffusers' example 25. diffusers makes "
                                     "N+1 model calls (the second timestep twice, PLMS warm-up); the last, at "
                                     "t=0, changes nothing and is skipped here."),
            ],
            outputs=[io.Sigmas.Output(tooltip="Noise levels at the published timesteps, ending in 0.")],
        )

    @classmethod
    def execute(cls, model, steps) -> io.NodeOutput:
        table = model.get_model_object("model_sampling").sigmas.float().cpu()
        ts = schedule.leading_timesteps(steps, num_train_timesteps=len(table))
        return io.NodeOutput(torch.cat([table[ts], table.new_zeros(1)]))


NODES = [BlipPNDMSampler, BlipPNDMScheduler]

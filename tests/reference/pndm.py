"""diffusers' PNDMScheduler loop (as BlipDiffusionPipeline configures it) on a fake epsilon.

args: {"steps": [..], "guidance": {"scale", "cond", "uncond"} (optional), "noise_seed",
"noise_shape" (optional)}; inputs: "x" (initial latents, unit-variance noise).
outputs: "alphas_cumprod"; per n in steps "timesteps_n" and "final_n"; with noise_seed,
"noise": the pipeline's own initial latents for that seed (randn_tensor on CPU).
"""
import math

import torch
from diffusers import PNDMScheduler
from diffusers.utils.torch_utils import randn_tensor

from common import io


def fake_eps(x, t, a, c=0.0):
    """Mirrored in tests/test_pndm.py. A bounded, nonlinear x0 guess turned into epsilon at
    alpha_bar ``a`` = alpha_bar[t], so latents keep a real model's range; c stands for the prompt."""
    t = float(t)
    x0 = 1.5 * torch.tanh(1.5 * x + 0.002 * t + c) * math.cos(t / 120.0)
    return (x - math.sqrt(a) * x0) / math.sqrt(1.0 - a)


def main():
    args, tensors, save = io()
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          skip_prk_steps=True, set_alpha_to_one=False, steps_offset=0,
                          timestep_spacing="leading", prediction_type="epsilon")
    g = args.get("guidance")

    def eps(x, t):
        a = float(sched.alphas_cumprod[t])
        if g is None:
            return fake_eps(x, t, a)
        # The pipeline's classifier-free guidance: one batch [uncond, cond], then combine.
        both = fake_eps(torch.cat([x, x]), t, a, torch.tensor([g["uncond"], g["cond"]]).view(2, 1, 1, 1)
                        .repeat_interleave(x.shape[0], 0))
        e_u, e_c = both.chunk(2)
        return e_u + g["scale"] * (e_c - e_u)

    out = {"alphas_cumprod": sched.alphas_cumprod}
    for n in args["steps"]:
        sched.set_timesteps(n)
        latents = tensors["x"].clone() * sched.init_noise_sigma
        for t in sched.timesteps:
            latents = sched.step(eps(latents, int(t)), t, latents).prev_sample
        out[f"timesteps_{n}"] = sched.timesteps.double()
        out[f"final_{n}"] = latents
    if "noise_seed" in args:
        gen = torch.Generator("cpu").manual_seed(args["noise_seed"])
        out["noise"] = randn_tensor(tuple(args["noise_shape"]), generator=gen, dtype=torch.float32)
    save(out)


if __name__ == "__main__":
    main()

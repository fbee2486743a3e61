"""The published PNDM sampler against diffusers' PNDMScheduler (reference env), alone and
through the host's own sampling entry point.

The model is a fake epsilon that tests/reference/pndm.py implements identically, so the
comparison isolates the sampler: timesteps, warm-up, multistep weights, the last step,
the host's noise scaling and its sigma <-> timestep round trip.
"""
from __future__ import annotations

import math

import pytest
import torch

from refenv import run_reference

from blip_diffusion.blip_core import pndm, schedule

pytestmark = pytest.mark.reference

TIMESTEP_CASES = [1, 2, 7, 10, 25, 30, 50, 100]
LOOP_CASES = [2, 7, 10, 25, 30]
HOST_CASES = [10, 25]
GUIDANCE = {"scale": 7.5, "cond": 0.05, "uncond": -0.05}
SHAPE = (2, 4, 8, 8)
NOISE_SEED = 1234


def fake_eps(x, t, a, c=0.0):
    """Same as tests/reference/pndm.py: a bounded nonlinear x0 guess as epsilon at alpha_bar a."""
    t = float(t)
    x0 = 1.5 * torch.tanh(1.5 * x + 0.002 * t + c) * math.cos(t / 120.0)
    return (x - math.sqrt(a) * x0) / math.sqrt(1.0 - a)


ALPHAS = schedule.alphas_cumprod()  # bit-equal to diffusers' table (test_alphas_cumprod_bit_equal)


def fake_eps_at(x, t):
    return fake_eps(x, t, float(ALPHAS[int(t)]))


@pytest.fixture(scope="module")
def noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ref(noise):
    steps = sorted(set(TIMESTEP_CASES + LOOP_CASES))
    return run_reference("pndm.py", {"steps": steps}, {"x": noise})


@pytest.fixture(scope="module")
def ref_guided(noise):
    return run_reference("pndm.py", {"steps": HOST_CASES, "guidance": GUIDANCE,
                                     "noise_seed": NOISE_SEED, "noise_shape": list(SHAPE)}, {"x": noise})


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# (a) schedule --------------------------------------------------------------------------

@pytest.mark.parametrize("steps", TIMESTEP_CASES)
def test_timesteps_equal_diffusers(ref, steps):
    assert pndm.pndm_timesteps(steps) == [int(t) for t in ref[f"timesteps_{steps}"].tolist()]


def test_alphas_cumprod_bit_equal(ref):
    assert torch.equal(schedule.alphas_cumprod(), ref["alphas_cumprod"])


# (b) the loop in diffusers' own terms ----------------------------------------------------

def run_ours(noise, steps, final_alpha=None):
    return pndm.sample_plms(fake_eps_at, noise.clone(), pndm.pndm_timesteps(steps), schedule.alphas_cumprod(),
                            final_alpha_cumprod=final_alpha)


@pytest.mark.parametrize("steps", LOOP_CASES)
def test_loop_matches_diffusers(ref, noise, steps):
    err = max_err(run_ours(noise, steps), ref[f"final_{steps}"])
    print(f"blip_core loop vs diffusers, {steps} steps: max |diff| = {err:.2e}"
          f" (max |latent| {ref[f'final_{steps}'].abs().max():.2f})")
    assert err < 1e-5


def plms_without_warmup(noise, steps):
    """A plausible mistake: plain Adams-Bashforth from the first step, no repeated timestep."""
    weights = [(1,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24)]
    ac = schedule.alphas_cumprod()
    ts = schedule.leading_timesteps(steps)
    alphas = [float(ac[t]) for t in ts] + [float(ac[0])]
    x, hist = noise.clone(), []
    for i, t in enumerate(ts):
        hist = (hist + [fake_eps_at(x, t)])[-4:]
        e = sum(w * h for w, h in zip(weights[len(hist) - 1], reversed(hist)))
        x = pndm.plms_step(x, e, alphas[i], alphas[i + 1])
    return x


@pytest.mark.parametrize("steps", [10, 25])
def test_loop_comparison_is_sensitive(ref, noise, steps):
    """The tolerance above would catch a missing warm-up or a last step to alpha_bar = 1."""
    no_warmup = max_err(plms_without_warmup(noise, steps), ref[f"final_{steps}"])
    to_one = max_err(run_ours(noise, steps, final_alpha=1.0), ref[f"final_{steps}"])
    print(f"{steps} steps: without warm-up {no_warmup:.1e}, last step to alpha_bar=1 {to_one:.1e}")
    assert no_warmup > 1e-4 and to_one > 1e-4


# (c) through the host -------------------------------------------------------------------

@pytest.fixture(scope="module")
def host():
    import comfy_inprocess  # noqa: F401  (puts comfy on sys.path, CPU mode)
    import comfy.model_base
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models

    from blip_diffusion.nodes import nodes_sampler

    class FakeUNet(torch.nn.Module):
        """Stands in for the SD1.5 UNet: epsilon = fake_eps(x, t, prompt scalar); records t."""

        def __init__(self, **_config):
            super().__init__()
            self.dtype = torch.float32
            self.anchor = torch.nn.Parameter(torch.zeros(1))
            self.seen_t = []

        def forward(self, x, timesteps, context=None, **_kw):
            assert torch.all(timesteps == timesteps[0])
            t = float(timesteps[0])
            self.seen_t.append(t)
            c = context[:, 0, 0].view(-1, 1, 1, 1)
            return fake_eps(x, t, float(ALPHAS[int(t)]), c)

    def make_model():
        cfg = comfy.supported_models.SD15(comfy.supported_models.SD15.unet_config)
        base = comfy.model_base.BaseModel(cfg, comfy.model_base.ModelType.EPS, device=torch.device("cpu"),
                                          unet_model=FakeUNet)
        return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"),
                                                offload_device=torch.device("cpu"))

    def cond(value):
        return [[torch.full((1, 77, 768), float(value)), {}]]

    def sample(patcher, noise, steps, full_denoise=True, callback=None):
        sigmas = nodes_sampler.BlipPNDMScheduler.execute(patcher, steps).result[0]
        sampler = nodes_sampler.BlipPNDMSampler.execute(full_denoise).result[0]
        out = comfy.sample.sample_custom(patcher, noise.clone(), GUIDANCE["scale"], sampler, sigmas,
                                         cond(GUIDANCE["cond"]), cond(GUIDANCE["uncond"]),
                                         torch.zeros_like(noise), callback=callback, disable_pbar=True,
                                         seed=NOISE_SEED)
        # The host returns process_latent_out(x) = x / 0.18215; diffusers decodes latents / 0.18215.
        return out * patcher.model.latent_format.scale_factor, sigmas

    return make_model, sample, comfy.sample


@pytest.mark.parametrize("steps", HOST_CASES)
def test_host_sampling_matches_diffusers(host, ref_guided, noise, steps):
    make_model, sample, _ = host
    patcher = make_model()
    calls = []
    final, sigmas = sample(patcher, noise, steps, callback=lambda *a: calls.append((a[0], a[3])))
    ref_final = ref_guided[f"final_{steps}"]
    err = max_err(final, ref_final)
    print(f"host SamplerCustom path vs diffusers, {steps} steps, cfg {GUIDANCE['scale']}: max |diff| = {err:.2e}")
    assert err < 1e-4

    # The UNet saw diffusers' exact integer timesteps, minus the no-op call at t=0.
    ref_t = [int(t) for t in ref_guided[f"timesteps_{steps}"].tolist()]
    assert patcher.model.diffusion_model.seen_t == [float(t) for t in ref_t[:-1]]
    # One progress callback per host step, with the host's own step count.
    assert calls == [(i, len(sigmas) - 1) for i in range(len(sigmas) - 1)]


def test_host_without_full_denoise_misses(host, ref_guided, noise):
    """The host's default noise rule (pure noise only at sigma_max) visibly breaks parity."""
    make_model, sample, _ = host
    final, _ = sample(make_model(), noise, 25, full_denoise=False)
    err = max_err(final, ref_guided["final_25"])
    print(f"host path with the host's own noise rule: max |diff| = {err:.1e}")
    assert err > 1e-3


def test_host_noise_equals_pipeline_noise(host, ref_guided):
    """SamplerCustom's seeded noise is the pipeline's initial latents for the same seed."""
    _, _, comfy_sample = host
    noise = comfy_sample.prepare_noise(torch.zeros(SHAPE), NOISE_SEED)
    assert torch.equal(noise, ref_guided["noise"])


def test_scheduler_sigmas_are_the_model_table(host):
    make_model, _, _ = host
    from blip_diffusion.nodes import nodes_sampler

    patcher = make_model()
    table = patcher.get_model_object("model_sampling").sigmas
    sigmas = nodes_sampler.BlipPNDMScheduler.execute(patcher, 25).result[0]
    ac = schedule.alphas_cumprod(dtype=torch.float64)
    expected = [math.sqrt((1 - ac[t]) / ac[t]) for t in range(960, -1, -40)] + [0.0]
    assert len(sigmas) == 26 and torch.equal(sigmas[:-1], table[list(range(960, -1, -40))])
    assert torch.allclose(sigmas.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6)

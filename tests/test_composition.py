"""Subjects in composition, through a real host's HTTP API: the host's own conditioning nodes
(ConditioningSetMask, ConditioningSetArea(Percentage), ConditioningSetTimestepRange, ConditioningCombine,
ConditioningConcat) on SubjectConditioning outputs, and SubjectConditioning's subject_strength and
subject_end.

How the host uses such conditioning (comfy/samplers.py, ComfyUI 0.3.75): every entry of a positive
conditioning list is run through the UNet on its own (batched) and the predictions are averaged with
weights: 1 everywhere for a plain entry, the mask (upscaled to the latent) for a masked one, the box (its
edges feathered) for an area one, which the UNet then sees alone. An entry with a timestep range is used
only at model calls whose sigma lies in it: ``start_percent``/``end_percent`` p become the sigma at
timestep (1 - p) * 999 of the model's schedule, and the entry is active at sigma s when
sigma(end) <= s <= sigma(start). Nothing in that machinery looks inside the conditioning tensor, so a
subject spliced into CLIP's output composes like any text prompt.

Renders are 64 px (an 8x8 latent; 128 x 64 for boxes), 2 PNDM steps (two UNet calls: t=500 and the
warm-up probe at t=0) except the timestep-range renders, 4 steps (calls at t = 750, 500 (probe), 500,
250). Final latents are read back with SaveLatent. Where a proof needs sampling outside the host's
sampler (a conditioning switched by hand at a step), the host's CLIP and UNet are loaded in this process
as Load BLIP-Diffusion loads them, and the published PNDM loop (blip_core.pndm) runs on them.
"""
from __future__ import annotations

import uuid

import pytest
import torch
from safetensors.torch import load_file

from graphs import put_input_image
from paths import ROOT, TEST_MODEL
SIZE, STEPS, CFG = 64, 2, 7.5
PROMPT = "on a beach"
ASSETS = ROOT / "workflows" / "assets"
TAG = uuid.uuid4().hex[:6]


# -- graph building ------------------------------------------------------------------------------------
def base_graph(width: int = SIZE) -> dict:
    return {
        "loader": {"class_type": "BlipDiffusionLoader", "inputs": {"model_name": TEST_MODEL}},
        "negative": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["loader", 1], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": SIZE, "batch_size": 1}},
        "sampler": {"class_type": "BlipPNDMSampler", "inputs": {"full_denoise": True}},
    }


def add_photo_subject(g: dict, key: str, image: str, category: str) -> list:
    g[f"photo_{key}"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    g[f"subject_{key}"] = {"class_type": "SubjectEncode",
                           "inputs": {"subject_encoder": ["loader", 3], "images": [f"photo_{key}", 0],
                                      "category": category, "image_weights": "", "preprocess": "diffusers"}}
    return [f"subject_{key}", 0]


def add_cond(g: dict, key: str, subject: list, prompt: str = PROMPT, **extra) -> list:
    """SubjectConditioning with the shipped workflows' inputs; ``extra``: inputs they do not have."""
    g[key] = {"class_type": "SubjectConditioning",
              "inputs": {"clip": ["loader", 1], "subject": subject, "prompt": prompt, "target_category": "",
                         "prompt_strength": 1.0, "prompt_reps": 20, **extra}}
    return [key, 0]


def add_node(g: dict, key: str, class_type: str, **inputs) -> list:
    g[key] = {"class_type": class_type, "inputs": inputs}
    return [key, 0]


def add_text(g: dict, key: str, text: str) -> list:
    return add_node(g, key, "CLIPTextEncode", clip=["loader", 1], text=text)


def combine(g: dict, key: str, *conds: list) -> list:
    out = conds[0]
    for i, c in enumerate(conds[1:]):
        out = add_node(g, f"{key}_{i}", "ConditioningCombine", conditioning_1=out, conditioning_2=c)
    return out


def add_render(g: dict, name: str, positive: list, seed: int, steps: int = STEPS) -> None:
    g[f"sigmas_{name}"] = {"class_type": "BlipPNDMScheduler", "inputs": {"model": ["loader", 0], "steps": steps}}
    g[f"sample_{name}"] = {"class_type": "SamplerCustom",
                           "inputs": {"model": ["loader", 0], "add_noise": True, "noise_seed": seed, "cfg": CFG,
                                      "positive": positive, "negative": ["negative", 0], "sampler": ["sampler", 0],
                                      "sigmas": [f"sigmas_{name}", 0], "latent_image": ["latent", 0]}}
    g[f"save_{name}"] = {"class_type": "SaveLatent",
                         "inputs": {"samples": [f"sample_{name}", 0], "filename_prefix": f"latents/comp_{TAG}_{name}"}}


def run_renders(server, api, g: dict) -> dict[str, torch.Tensor]:
    """Run the graph once; every SaveLatent's final latent (the host's scale) by render name."""
    result = api.run(g)
    out = {}
    for key in g:
        if key.startswith("save_"):
            entry = result.outputs[key]["latents"][0]
            path = server.base_dir / "output" / entry["subfolder"] / entry["filename"]
            out[key[len("save_"):]] = load_file(str(path))["latent_tensor"]
    return out


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().mean().item()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module")
def client(comfy_server):
    from blip_diffusion.api.client import ComfyClient

    return ComfyClient(comfy_server.url)


@pytest.fixture(scope="module")
def photos(comfy_server) -> dict[str, tuple[str, str]]:
    """Three distinct subjects from the shipped photos: (image name, category)."""
    return {"a": (put_input_image(comfy_server, ASSETS / "sample_subject.png"), "teapot"),
            "b": (put_input_image(comfy_server, ASSETS / "sample_kettle.png"), "kettle"),
            "c": (put_input_image(comfy_server, ASSETS / "sample_scene.png"), "house")}


@pytest.fixture(scope="module")
def random_subject():
    from blip_diffusion.blip_core.subject import Subject

    return Subject(torch.randn(1, 16, 768, generator=torch.Generator().manual_seed(3)), "teapot", {})


@pytest.fixture(scope="module")
def in_process(test_model_dir, random_subject):
    """The host's CLIP and UNet loaded in this process as Load BLIP-Diffusion loads them in the session host
    (the same files, fp32), the conditionings SubjectConditioning makes from the random subject, and the
    empty negative."""
    from conftest import comfy_on_path

    comfy_on_path()
    from blip_diffusion.nodes import host_models
    from blip_diffusion.nodes.nodes_conditioning import SubjectConditioning

    clip = host_models.load_clip(str(test_model_dir / "text_encoder"))
    unet = host_models.load_unet(str(test_model_dir / "unet"), {"dtype": torch.float32})

    def condition(prompt_reps=20, subject=random_subject, **extra):
        return SubjectConditioning.execute(clip, subject, PROMPT, "", 1.0, prompt_reps, **extra).args[0]

    uncond = clip.encode_from_tokens(clip.tokenize(""))
    return {"clip": clip, "unet": unet, "subject": random_subject, "condition": condition,
            "with_subject": condition()[0][0], "subject_free": condition(subject_strength=0.0)[0][0],
            "uncond": uncond, "switched": {}}


# -- regions: a subject per half, the scene prompt everywhere --------------------------------------------
SCENE = "a beach at sunset"
REGION_SEED = 1
WIDE = 2 * SIZE  # boxes: ConditioningSetArea's smallest box is 64 px, half of a 128 x 64 picture
# mean |change| of the final latent, right half / left half, when the right subject is replaced (B -> C).
# Measured on the generated weights, 2 steps, seed 1: masks (64 x 64) 7.2, boxes (128 x 64) 33.5. Other
# seeds: masks 5.6-7.8 (seeds 2-5; at 3 steps 4.8-6.4), boxes 38.6 (seed 2; at 3 steps 29.8-31.2). What
# leaks left is the UNet's reach across the border (convolutions, self-attention), less for boxes, where
# the subject's UNet pass sees its box alone; a subject applied everywhere would give ~1.
RATIO_GATES = {"mask": 5.0, "box": 20.0}
MIN_RIGHT_CHANGE = 0.2  # measured ~0.6: the replaced subject is not ignored


def half_mask(g: dict, key: str, left: bool) -> list:
    """1 on one half of the picture, 0 on the other, from the host's mask nodes."""
    full = add_node(g, f"{key}_ones", "SolidMask", value=1.0, width=SIZE, height=SIZE)
    half = add_node(g, f"{key}_zeros", "SolidMask", value=0.0, width=SIZE // 2, height=SIZE)
    return add_node(g, key, "MaskComposite", destination=full, source=half, x=SIZE // 2 if left else 0, y=0,
                    operation="multiply")


def region_graph(photos: dict, kind: str) -> dict:
    """Subject A on the left, B or C on the right, the scene prompt everywhere, all ConditioningCombine'd:
    by masks (ConditioningSetMask), or by boxes (ConditioningSetArea in pixels for A,
    ConditioningSetAreaPercentage for B and C)."""
    g = base_graph(SIZE if kind == "mask" else WIDE)
    conds = {k: add_cond(g, f"cond_{k}", add_photo_subject(g, k, *photos[k])) for k in "abc"}
    if kind == "mask":
        left, right = half_mask(g, "left", True), half_mask(g, "right", False)
        placed = {k: add_node(g, f"masked_{k}", "ConditioningSetMask", conditioning=conds[k], mask=m, strength=1.0,
                              set_cond_area="default") for k, m in (("a", left), ("b", right), ("c", right))}
    else:
        placed = {"a": add_node(g, "boxed_a", "ConditioningSetArea", conditioning=conds["a"], width=WIDE // 2,
                                height=SIZE, x=0, y=0, strength=1.0)}
        for k in "bc":
            placed[k] = add_node(g, f"boxed_{k}", "ConditioningSetAreaPercentage", conditioning=conds[k], width=0.5,
                                 height=1.0, x=0.5, y=0.0, strength=1.0)
    scene = add_text(g, "scene", SCENE)
    for k in "bc":
        add_render(g, k, combine(g, f"combined_{k}", scene, placed["a"], placed[k]), REGION_SEED)
    return g


@pytest.mark.parametrize("kind", ["mask", "box"])
def test_replacing_the_right_subject_changes_the_right_half(comfy_server, client, photos, kind):
    renders = run_renders(comfy_server, client, region_graph(photos, kind))
    delta = (renders["c"].double() - renders["b"].double()).abs()
    half = delta.shape[-1] // 2
    left, right = delta[..., :half].mean().item(), delta[..., half:].mean().item()
    print(f"{kind}: mean |change| left {left:.4f}, right {right:.4f}, ratio {right / left:.1f}")
    assert right > MIN_RIGHT_CHANGE
    assert right / left >= RATIO_GATES[kind]


# -- subject strength, ConditioningConcat, ConditioningCombine -------------------------------------------
SEED = 7
STRENGTHS = (0.5, 1.5)


@pytest.fixture(scope="module")
def subject_renders(comfy_server, client, photos) -> dict[str, torch.Tensor]:
    g = base_graph()
    a, b = (add_photo_subject(g, k, *photos[k]) for k in "ab")
    published = add_cond(g, "published", a)  # as every shipped workflow has it: without the new inputs
    add_render(g, "published", published, SEED)
    add_render(g, "explicit_defaults", add_cond(g, "explicit", a, subject_strength=1.0, subject_end=1.0), SEED)
    add_render(g, "strength_0", add_cond(g, "s0", a, subject_strength=0.0), SEED)
    for s in STRENGTHS:
        add_render(g, f"strength_{s}", add_cond(g, f"s{s}", a, subject_strength=s), SEED)

    snow = add_text(g, "snow", "in the snow, watercolor")
    add_render(g, "concat_a", add_node(g, "concat_a", "ConditioningConcat", conditioning_to=published,
                                       conditioning_from=snow), SEED)
    add_render(g, "concat_b", add_node(g, "concat_b", "ConditioningConcat",
                                       conditioning_to=add_cond(g, "published_b", b), conditioning_from=snow), SEED)
    add_render(g, "combine_self", add_node(g, "combine_self", "ConditioningCombine", conditioning_1=published,
                                           conditioning_2=published), SEED)
    return run_renders(comfy_server, client, g)


def test_default_strength_is_the_published_render_bit_for_bit(subject_renders):
    """A graph without the new inputs (every shipped workflow) and one with their defaults render the same."""
    assert torch.equal(subject_renders["explicit_defaults"], subject_renders["published"])
    assert max_abs(subject_renders["strength_0"], subject_renders["published"]) > 0.1  # the comparison can fail


def test_default_strength_returns_the_published_conditioning(in_process):
    """At the defaults SubjectConditioning returns what it returned before subject_strength existed (its
    code then: prompt_layout, encode_spliced, one entry with the pooled output), the same tensors."""
    from blip_diffusion.nodes import host_clip

    clip, subject = in_process["clip"], in_process["subject"]
    layout = host_clip.prompt_layout(clip, PROMPT, subject.category, 1.0, 20, subject.tokens)
    cond, pooled = host_clip.encode_spliced(clip, layout, subject.embedding[0])
    for out in (in_process["condition"](), in_process["condition"](subject_strength=1.0, subject_end=1.0)):
        assert len(out) == 1 and set(out[0][1]) == {"pooled_output"}
        assert torch.equal(out[0][0], cond) and torch.equal(out[0][1]["pooled_output"], pooled)


def test_zero_strength_ignores_the_subject(in_process):
    """subject_strength 0 is the text alone: another subject gives the same conditioning, bit for bit (and at
    0.5 it does not)."""
    from blip_diffusion.blip_core.subject import Subject

    other = Subject(in_process["subject"].embedding.flip(1), in_process["subject"].category)
    for s, same in ((0.0, True), (0.5, False)):
        mine, theirs = in_process["condition"](subject_strength=s), in_process["condition"](subject_strength=s,
                                                                                           subject=other)
        assert torch.equal(mine[0][0], theirs[0][0]) is same
        assert torch.equal(mine[0][1]["pooled_output"], theirs[0][1]["pooled_output"]) is same


def test_zero_strength_is_the_prompt_without_the_subject(in_process):
    """With one copy of the prompt the subject-free ids are CLIPTextEncode's for the same words: at strength 0
    SubjectConditioning returns exactly CLIPTextEncode's rows, reordered, and the UNet reads them as a set
    (its cross-attention has no positions), so its prediction is the same up to the order of the sums."""
    from blip_diffusion.blip_core import subject_strength as st

    clip, model = in_process["clip"], in_process["unet"].model
    text, pooled = clip.encode_from_tokens(clip.tokenize(f"a {in_process['subject'].category} {PROMPT}"),
                                           return_pooled=True)
    (cond, extras), = in_process["condition"](prompt_reps=1, subject_strength=0.0)
    assert torch.equal(cond, st.align_free(text)) and torch.equal(extras["pooled_output"], pooled)
    assert not torch.equal(cond, text)  # reordered indeed
    x = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0)) * 10
    sigma = model.model_sampling.sigma(torch.tensor([500.0]))
    with torch.inference_mode():
        as_text, as_node = (model.apply_model(x, sigma, c_crossattn=c) for c in (text, cond))
        as_other = model.apply_model(x, sigma, c_crossattn=in_process["subject_free"])  # 20 copies: other words
    err, other = max_abs(as_node, as_text), max_abs(as_other, as_text)
    print(f"UNet prediction, strength 0 vs CLIPTextEncode of the same words: max abs {err:.2e} "
          f"(of {as_text.abs().max().item():.1f}; other words: {other:.2e})")
    assert err <= 1e-5
    assert other > 1e-2


def test_strength_moves_the_render_monotonically_away_from_the_text(subject_renders):
    """The distance of the final latent from the subject-free render (strength 0) grows with the strength:
    0 at 0, then 0.5, 1 (published), 1.5 (extrapolated) strictly increasing."""
    base = subject_renders["strength_0"]
    dist = {0.0: 0.0, **{s: mean_abs(subject_renders[f"strength_{s}"], base) for s in STRENGTHS},
            1.0: mean_abs(subject_renders["published"], base)}
    ordered = [dist[s] for s in sorted(dist)]
    print("mean |latent - subject-free latent| by subject_strength:", {s: round(d, 4) for s, d in sorted(dist.items())})
    assert all(a < b for a, b in zip(ordered, ordered[1:]))
    assert ordered[1] > 0.02


def test_concat_adds_text_and_keeps_the_subject(subject_renders):
    """ConditioningConcat of a subject conditioning with a text one (the host joins their token rows, 77 + 77)
    renders differently from the subject alone, and still differently for another subject."""
    with_text, alone = subject_renders["concat_a"], subject_renders["published"]
    to_text, to_subject = mean_abs(with_text, alone), mean_abs(with_text, subject_renders["concat_b"])
    print(f"concat: vs the subject alone {to_text:.4f}, vs another subject concatenated {to_subject:.4f}")
    assert to_text > 0.05
    assert to_subject > 0.05


def test_combining_a_subject_with_itself_is_the_subject(subject_renders):
    """ConditioningCombine of a subject conditioning with itself: the host averages two equal predictions."""
    err = max_abs(subject_renders["combine_self"], subject_renders["published"])
    print(f"combine with itself vs alone: max abs {err:.2e}")
    assert err <= 1e-5


# -- timestep ranges: the subject for the first k of n steps --------------------------------------------
TS_STEPS, TS_SEED = 4, 21


def switch_percent(k: int) -> float:
    """A start/end percent whose sigma falls between the k-1-th and k-th published timesteps (for 4 steps:
    750, 500, 250, 0): the host maps percent p to the sigma at timestep (1 - p) * 999."""
    from blip_diffusion.blip_core import schedule

    ts = schedule.leading_timesteps(TS_STEPS)
    return round(1.0 - (ts[k - 1] + ts[k]) / 2 / 999.0, 4)


@pytest.fixture(scope="module")
def saved_random_subject(comfy_server, random_subject) -> str:
    """The random subject as a Save Subject file, for Load Subject in the host."""
    from blip_diffusion.blip_core.subject_io import save_subject

    name = f"comp_{TAG}"
    save_subject(random_subject, str(comfy_server.base_dir / "models" / "blip_subjects"), name)
    return f"{name}.safetensors"


@pytest.fixture(scope="module")
def timestep_renders(comfy_server, client, saved_random_subject) -> dict[str, torch.Tensor]:
    g = base_graph()
    subject = add_node(g, "subject", "LoadSubject", subject_name=saved_random_subject)
    with_subject = add_cond(g, "with_subject", subject)
    subject_free = add_cond(g, "subject_free", subject, subject_strength=0.0)
    for k in (1, 2):
        p = switch_percent(k)
        first = add_node(g, f"first_{k}", "ConditioningSetTimestepRange", conditioning=with_subject, start=0.0, end=p)
        rest = add_node(g, f"rest_{k}", "ConditioningSetTimestepRange", conditioning=subject_free, start=p, end=1.0)
        add_render(g, f"range_{k}", combine(g, f"ranges_{k}", first, rest), TS_SEED, TS_STEPS)
    add_render(g, "subject_end_2", add_cond(g, "until_2", subject, subject_end=switch_percent(2)), TS_SEED, TS_STEPS)
    return run_renders(comfy_server, client, g)


def switched_by_hand(env: dict, subject_calls: int) -> torch.Tensor:
    if subject_calls not in env["switched"]:
        env["switched"][subject_calls] = sample_switched(env, subject_calls)
    return env["switched"][subject_calls]


def sample_switched(env: dict, subject_calls: int) -> torch.Tensor:
    """The render of ``timestep_renders`` sampled here, outside the host's sampler: the published PNDM
    loop (blip_core.pndm) on the host's UNet with CFG written out, the subject conditioning for the first
    ``subject_calls`` model calls and the subject-free one after. PLMS calls the model twice in its first
    step (at its sigma and at the next one: the warm-up probe), once in each later step, so the first k
    steps are k + 1 calls."""
    from blip_diffusion.blip_core import pndm, schedule

    model = env["unet"].model
    table = model.model_sampling.sigmas.float()
    sigmas = torch.cat([table[schedule.leading_timesteps(TS_STEPS, len(table))], table.new_zeros(1)])
    noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(TS_SEED))
    x = noise * torch.sqrt(1.0 + sigmas[0] ** 2.0)  # pure noise at the first sigma (full_denoise)
    calls = []

    def denoise(x_ve, sigma):
        cond = env["with_subject"] if len(calls) < subject_calls else env["subject_free"]
        calls.append(sigma)
        t = x_ve.new_ones([1]) * sigma
        out = model.apply_model(torch.cat([x_ve, x_ve]), torch.cat([t, t]),  # the host batches uncond first
                                c_crossattn=torch.cat([env["uncond"], cond]))
        uncond_pred, cond_pred = out.chunk(2)
        return uncond_pred + (cond_pred - uncond_pred) * CFG

    with torch.inference_mode():
        x = pndm.sample_plms_sigmas(denoise, x, sigmas, final_sigma=float(model.model_sampling.sigma_min))
    assert len(calls) == TS_STEPS  # 4 steps: t = 750, 500 (probe), 500, 250; the last step (t=0) is skipped
    return model.process_latent_out(x)


def test_switch_percents_fall_between_steps(in_process):
    """The premise of the timestep tests: the host's sigma for each switch percent lies strictly between the
    sigmas of the two steps around the switch."""
    from blip_diffusion.blip_core import schedule

    ms = in_process["unet"].model.model_sampling
    ts = schedule.leading_timesteps(TS_STEPS)
    for k in (1, 2):
        s = ms.percent_to_sigma(switch_percent(k))
        assert float(ms.sigma(torch.tensor(ts[k]))) < s < float(ms.sigma(torch.tensor(ts[k - 1])))


def test_subject_for_the_first_two_steps_is_a_switch_at_step_two(timestep_renders, in_process):
    """ConditioningSetTimestepRange [0, p] on the subject conditioning + [p, 1] on the subject-free one,
    p between steps 1 and 2 of 4, equals sampling that switches by hand after the first two steps."""
    host = timestep_renders["range_2"]
    by_hand = switched_by_hand(in_process, subject_calls=3)
    err = max_abs(host, by_hand)
    gaps = {n: max_abs(by_hand, switched_by_hand(in_process, calls)) for n, calls in
            (("a step earlier", 2), ("a step later (all four calls: throughout)", 4))}
    print(f"range [0, {switch_percent(2)}]: host vs switch by hand max abs {err:.2e}; the switch at other places "
          f"differs by {gaps}")
    assert err <= 1e-5
    assert min(gaps.values()) > 1e-3  # where the switch falls shows in the latent


def test_subject_for_the_first_step_leaves_out_its_warm_up_probe(timestep_renders, in_process):
    """The host picks a conditioning by the sigma of each model call. PLMS's first step also calls the
    model at the second sigma (the warm-up probe), which a range ending between steps 0 and 1 no longer
    covers: the subject conditions only the first model call, not the whole first step."""
    host = timestep_renders["range_1"]
    first_call = switched_by_hand(in_process, subject_calls=1)
    whole_step = switched_by_hand(in_process, subject_calls=2)
    err, gap = max_abs(host, first_call), max_abs(host, whole_step)
    print(f"range [0, {switch_percent(1)}]: host vs subject on the first call {err:.2e}, vs the whole first "
          f"step {gap:.2e}")
    assert err <= 1e-5
    assert gap > 1e-3


def test_subject_end_is_the_hosts_timestep_range(timestep_renders, in_process):
    """SubjectConditioning's subject_end p is ConditioningSetTimestepRange [0, p] on the subject conditioning
    combined with [p, 1] on the subject-free one (subject_strength 0): the same render, bit for bit; the
    node's output holds those two entries."""
    assert torch.equal(timestep_renders["subject_end_2"], timestep_renders["range_2"])
    p = switch_percent(2)
    first, rest = in_process["condition"](subject_end=p)
    assert torch.equal(first[0], in_process["with_subject"]) and torch.equal(rest[0], in_process["subject_free"])
    assert (first[1]["start_percent"], first[1]["end_percent"], rest[1]["start_percent"], rest[1]["end_percent"]) \
        == (0.0, p, p, 1.0)


# -- blip_core.subject_strength on its own ----------------------------------------------------------------
def test_aligned_subject_free_rows_hold_the_same_tokens():
    """Reordered, the subject-free prompt has each token where the subject prompt has it, and padding in
    the subject's 16 slots; as a set its rows are unchanged."""
    from blip_diffusion.blip_core import subject_strength as st
    from blip_diffusion.blip_core.prompting import CONTEXT_LENGTH, SUBJECT_BEGIN, SUBJECT_TOKENS

    bos, eos, pad, subject_slot = 1, 2, 2, -1
    layout = [bos, 10, 11, 12, 13, eos] + [pad] * (CONTEXT_LENGTH - SUBJECT_TOKENS - 6)  # 61 ids, as a TokenLayout
    with_subject = layout[:SUBJECT_BEGIN] + [subject_slot] * SUBJECT_TOKENS + layout[SUBJECT_BEGIN:]
    free = st.subject_free_ids(layout, pad)
    order = st.aligned_order()
    assert len(free) == CONTEXT_LENGTH and sorted(order) == list(range(CONTEXT_LENGTH))
    aligned = [free[i] for i in order]
    assert [t for t, s in zip(aligned, with_subject) if s != subject_slot] == [t for t in with_subject
                                                                              if t != subject_slot]
    assert aligned[SUBJECT_BEGIN:SUBJECT_BEGIN + SUBJECT_TOKENS] == [pad] * SUBJECT_TOKENS
    rows = torch.randn(1, CONTEXT_LENGTH, 3)
    assert torch.equal(st.align_free(rows), rows[:, order])


def test_blend_and_schedule_ends():
    from blip_diffusion.blip_core import subject_strength as st

    subject, free = torch.randn(1, 77, 8), torch.randn(1, 77, 8)
    assert st.blend(subject, free, 1.0) is subject
    assert torch.equal(st.blend(subject, free, 0.0), free)
    assert torch.allclose(st.blend(subject, free, 1.5), free + 1.5 * (subject - free), atol=1e-6)
    with pytest.raises(ValueError):
        st.blend(subject, free, -0.1)
    a, b = [subject, {"pooled_output": 1}], [free, {"pooled_output": 2}]
    assert st.scheduled(a, b, 1.0) == [a] and st.scheduled(a, b, 0.0) == [b]
    first, rest = st.scheduled(a, b, 0.4)
    assert first[0] is subject and first[1] == {"pooled_output": 1, "start_percent": 0.0, "end_percent": 0.4}
    assert rest[0] is free and rest[1] == {"pooled_output": 2, "start_percent": 0.4, "end_percent": 1.0}

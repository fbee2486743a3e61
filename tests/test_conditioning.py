"""SubjectConditioning against the reference pipeline's text conditioning (in-process host CLIP)."""
import logging
import types

import pytest
import torch

from conftest import comfy_on_path
from refenv import run_reference

pytestmark = pytest.mark.reference

LONG = ("wearing a tiny red knitted scarf and sitting on a weathered oak bench beside a calm alpine lake "
        "while snowflakes drift past tall pine trees under a pale winter sky in soft morning light, "
        "with snowy mountains, a frozen waterfall, a red wooden cabin, a sleeping fox, a lantern, "
        "and grey smoke rising slowly from its chimney far away in the valley")
PROMPTS = ["swimming underwater", "(in the snow) [watercolor], 4k:1.2", LONG]


@pytest.fixture(scope="module")
def host_clip(test_model_dir):
    comfy_on_path()
    from blip_diffusion.nodes import host_models

    return host_models.load_clip(str(test_model_dir / "text_encoder"))


@pytest.fixture(scope="module")
def subject():
    from blip_diffusion.blip_core.subject import Subject

    gen = torch.Generator().manual_seed(7)
    return Subject(torch.randn(1, 16, 768, generator=gen), "dog")


@pytest.fixture(scope="module")
def reference(test_model_dir, subject):
    return run_reference("conditioning.py", {"model_dir": str(test_model_dir), "prompts": PROMPTS,
                                             "category": "dog"}, {"ctx": subject.embedding})


def condition(clip, subject, prompt, target=""):
    from blip_diffusion.nodes.nodes_conditioning import SubjectConditioning

    out = SubjectConditioning.execute(clip, subject, prompt, target, 1.0, 20)
    cond, extra = out.args[0][0]
    return cond, extra


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_conditioning_matches_reference(host_clip, subject, reference, index):
    cond, extra = condition(host_clip, subject, PROMPTS[index])
    ref = reference[f"cond_{index}"]
    assert cond.shape == ref.shape == (1, 77, 768)
    err = (cond.float() - ref).abs().max().item()
    print(f"prompt {index}: conditioning max abs error {err:.2e}")
    assert err <= 1e-4, f"max abs error {err}"
    assert "pooled_output" in extra


def test_negative_branch_is_the_hosts_plain_encode(host_clip, reference):
    cond = host_clip.encode_from_tokens(host_clip.tokenize(""))
    assert (cond.float() - reference["uncond"]).abs().max().item() <= 1e-4


def test_subject_vectors_matter(host_clip, subject, reference):
    """The gate can fail: another subject gives another conditioning at the same prompt."""
    from blip_diffusion.blip_core.subject import Subject

    other = Subject(subject.embedding.flip(1), "dog")
    cond, _ = condition(host_clip, other, PROMPTS[0])
    assert (cond.float() - reference["cond_0"]).abs().max().item() > 1e-2


def test_dropped_words_are_reported(host_clip, subject, caplog):
    with caplog.at_level(logging.WARNING, logger="blip_diffusion"):
        condition(host_clip, subject, LONG)
    assert "far away in the valley" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="blip_diffusion"):
        condition(host_clip, subject, PROMPTS[0])
    assert "dropped" not in caplog.text  # cutting the repetitions is by design, not reported


def test_non_sd1_clip_is_refused_with_a_clear_error(subject):
    comfy_on_path()
    import comfy.sdxl_clip

    sdxl_like = types.SimpleNamespace(tokenizer=comfy.sdxl_clip.SDXLTokenizer())
    with pytest.raises(ValueError, match="SD 1.x CLIP.*clip_g.*clip_l"):
        condition(sdxl_like, subject, "on a beach")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_clip_takes_the_subject(test_model_dir, host_clip, subject, dtype):
    """On a GPU the host runs CLIP in fp16/bf16: the fp32 subject must still splice in, and the result
    stay within half precision's rounding (1% of the largest value) of the fp32 conditioning."""
    from blip_diffusion.nodes import host_models

    half = host_models.load_clip(str(test_model_dir / "text_encoder"), model_options={"dtype": dtype})
    got, _ = condition(half, subject, PROMPTS[0])
    want, _ = condition(host_clip, subject, PROMPTS[0])
    assert torch.isfinite(got).all()
    assert (got.float() - want).abs().max().item() <= 0.01 * want.abs().max().item()


def test_splice_puts_the_subject_after_bos_and_a():
    """The one splice rule (SubjectConditioning and the fine-tune): 16 vectors as one item after [BOS, "a"];
    no subject, the plain ids."""
    comfy_on_path()
    from blip_diffusion.blip_core import prompting
    from blip_diffusion.nodes import host_clip

    layout = prompting.TokenLayout([49406, 320, 1929, 49407])
    emb = torch.randn(16, 768)
    pairs = host_clip.token_pairs(layout, emb[None])
    assert [p[0] for p in pairs[:2]] == [49406, 320] and torch.equal(pairs[2][0], emb)
    assert [p[0] for p in pairs[3:]] == [1929, 49407] and {w for _, w in pairs} == {1.0}
    assert host_clip.token_pairs(layout.ids, None) == [(t, 1.0) for t in layout.ids]


def test_a_subject_too_long_for_the_text_encoder_is_refused():
    """A hand-made subject of 80 vectors would leave the 77 positions no room: refused by name, before the
    host's CLIP gets a 196-position input."""
    from blip_diffusion.blip_core.prompting import layout_tokens

    with pytest.raises(ValueError, match="the subject has 80 vectors, which leave the text encoder's 77 positions"):
        layout_tokens(lambda t: [1] * len(t.split()), str, "on a beach", "dog", 1.0, 20, 0, 2, 3, subject_tokens=80)

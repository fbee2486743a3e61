"""The editing rules of blip_core.editing on small hand-made inputs (no models, no host).

Expected values come from the method's definitions (LAVIS's mapper example, DDIM algebra, the
mask's pooling and upsampling worked out by hand), not from the code under test.
"""
import math

import pytest
import torch

from blip_diffusion.blip_core import editing
from blip_diffusion.blip_core.schedule import alphas_cumprod

BOS, EOS = 49406, 49407


def test_texts_follow_lavis():
    src, tgt = editing.edit_texts("dog", "teapot", "  sitting on the grass ")
    assert src == "a dog sitting on the grass"
    assert tgt == "a " + " ".join(["sks"] * 16) + " teapot sitting on the grass"


def test_mapper_skips_the_placeholders_and_maps_the_rest_in_order():
    # LAVIS's own example: "mapper[:2] = 0, 1; mapper[2:18] = -1; mapper[18:] = 2, 3, ...", then the
    # positions after the target text map to themselves.
    words = [320, 1929, 4919, 525, 518, 3914]           # a dog sitting on the grass
    src = [BOS] + words + [EOS]
    tgt = [BOS, 320] + [48136] * 16 + words[1:] + [EOS]   # a sks*16 dog sitting on the grass
    mapper, alphas = editing.refinement_mapper(src, tgt)
    n_src, n_tgt = len(src), len(tgt)
    assert mapper[:2].tolist() == [0, 1]
    assert alphas[2:18].eq(0).all() and alphas[:2].eq(1).all() and alphas[18:].eq(1).all()
    assert mapper[18:n_tgt].tolist() == list(range(2, n_src))
    assert mapper[n_tgt:].tolist() == list(range(n_tgt, 77))


def test_mapper_leaves_a_new_category_word_unaligned():
    src = [BOS, 320, 1929, 4919, EOS]                   # a dog sitting
    tgt = [BOS, 320] + [48136] * 16 + [3368, 4919, EOS]  # a sks*16 teapot sitting
    mapper, alphas = editing.refinement_mapper(src, tgt)
    # A mismatch scores -1 and two gaps 0: the new word stays unaligned (the target keeps its own
    # attention there) and everything around it is matched.
    assert mapper[:2].tolist() == [0, 1]
    assert alphas[18] == 0                                     # "teapot": no source column
    assert mapper[19].item() == 3 and alphas[19] == 1         # "sitting" -> "sitting"
    assert mapper[20].item() == 4 and alphas[20] == 1         # EOS -> EOS


def test_too_long_prompts_are_refused():
    with pytest.raises(editing.EditError, match="shorten"):
        editing.refinement_mapper(list(range(10)), list(range(90)))


def test_word_positions_count_subword_tokens():
    text = "a dachshund sitting on a dachshund"
    pieces = ["a", "dach", "shund", "sitting", "on", "a", "dach", "shund"]
    assert editing.word_positions(text, "dachshund", pieces) == [2, 3, 7, 8]
    assert editing.word_positions(text, "a", pieces) == [1, 6]
    assert editing.word_positions(text, "cat", pieces) == []


def test_word_positions_see_words_through_spacing_case_punctuation_and_hashes():
    # The tokens as CLIP decodes them: punctuation and '#' are tokens of their own, lower case.
    src, _ = editing.edit_texts("dog", "dog", "on the  Grass.\n#nofilter near a tree")
    assert src == "a dog on the Grass. #nofilter near a tree"
    pieces = ["a", "dog", "on", "the", "grass", ".", "#", "no", "filter", "near", "a", "tree"]
    assert editing.word_positions(src, "grass", pieces) == [5]
    assert editing.word_positions(src, "tree", pieces) == [12]
    assert editing.word_positions(src, "near", pieces) == [10]
    assert editing.word_positions(src, "gras", pieces) == []


@pytest.mark.parametrize("prompt, word", [
    ("sitting on the owner\u2019s lap", "lap"), ("in the \u8349 grass", "grass"), ("a \u72ac on grass", "\u72ac"),
    ("on a caf\u00e9 terrace", "terrace"), ("near the fa\u00e7ade, on gr\u00fcn grass.", "grass"),
    ("\u043d\u0430 \u0442\u0440\u0430\u0432\u0435 near a tree", "tree"), ("on the stra\u00dfe", "stra\u00dfe")])
def test_word_positions_hold_where_clip_spells_a_character_with_several_tokens(prompt, word, test_model_dir):
    # The real CLIP tokenizer (the generated model ships the released one's files). What is selected
    # must decode to the word itself: an independent check of the positions.
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(str(test_model_dir / "tokenizer"))
    ids = lambda text: hf(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    src, _ = editing.edit_texts("dog", "dog", prompt)
    src_ids = ids(src)
    pieces = [hf.decode([i]) for i in src_ids]
    found = editing.word_positions(src, word, pieces, lambda w: len(ids(w)))
    assert found, f"{word!r} not found in {src!r}"
    assert hf.decode([src_ids[p - 1] for p in found]).strip(" .,") == word.lower()
    assert found == sorted(found) and found[-1] - found[0] == len(found) - 1   # one occurrence: one run


def test_plan_counts_calls_as_lavis_tables_do():
    plan = editing.EditPlan(torch.arange(77), torch.ones(77), [2], calls=50)
    assert sum(plan.cross_active(c) for c in range(50)) == int(0.8 * 51)   # 40
    assert sum(plan.self_active(c) for c in range(50)) == int(50 * 0.4)    # 20
    assert plan.cross_active(0) and not plan.cross_active(40) and plan.self_active(19) and not plan.self_active(20)


def test_layers_by_resolution_pick_lavis_layers_at_512():
    # SD1.5 at 512 px: latent 64x64; cross maps at 64^2, 32^2, 16^2 (down and up), 8^2 (mid).
    n = (64, 64)
    assert editing.blend_layer(16 * 16, n, in_middle=False)
    assert not editing.blend_layer(32 * 32, n, in_middle=False)
    assert not editing.blend_layer(8 * 8, n, in_middle=True)
    assert editing.self_replace_layer(16 * 16, n) and editing.self_replace_layer(8 * 8, n)
    assert not editing.self_replace_layer(32 * 32, n)


@pytest.mark.parametrize("hw", [(64, 64), (65, 65), (66, 90), (125, 63), (9, 11), (8, 8)])
def test_map_size_is_what_the_unets_downsampling_makes(hw):
    # The UNet's downsampler: a 3x3 convolution with stride 2 and padding 1, applied twice.
    down = torch.nn.Conv2d(1, 1, 3, stride=2, padding=1)
    with torch.no_grad():
        out = down(down(torch.zeros(1, 1, *hw)))
    assert editing.map_size(hw) == tuple(out.shape[-2:])
    assert editing.blend_layer(out.shape[-2] * out.shape[-1], hw, in_middle=False)


def one_hot_spot_mask(map_hw: tuple[int, int], cell: tuple[int, int], latent_hw: tuple[int, int]) -> torch.Tensor:
    """The blend mask (h, w) of one layer and one head whose attention on word 5 peaks at ``cell`` of the map
    grid, threshold 0.3."""
    probs = torch.full((1, map_hw[0] * map_hw[1], 77), 0.01)
    probs[0, cell[0] * map_hw[1] + cell[1], 5] = 1.0
    state = editing.BlendState()
    state.add(probs)
    plan = editing.EditPlan(torch.arange(77), torch.ones(77), [5], calls=1, threshold=0.3)
    return editing.blend_mask(state, plan, latent_hw)[0, 0]


def test_blend_mask_at_a_side_that_is_not_a_multiple_of_4():
    # Latent 10x9 -> maps 3x3; the hot cell (2, 0) pools to rows 1-2, col 0-1, then nearest upsampling
    # maps latent row r to map row floor(r * 3 / 10) and column c to floor(c * 3 / 9).
    mask = one_hot_spot_mask((3, 3), (2, 0), (10, 9))
    expected = torch.tensor([[float(r * 3 // 10 >= 1 and c * 3 // 9 <= 1) for c in range(9)] for r in range(10)])
    assert torch.equal(mask, expected)


def test_refine_cross_takes_source_columns_where_aligned():
    p_src = torch.rand(2, 5, 77)
    p_tgt = torch.rand(2, 5, 77)
    mapper = torch.arange(77)
    mapper[10] = 3
    alphas = torch.ones(77)
    alphas[4] = 0
    plan = editing.EditPlan(mapper, alphas, [], calls=1)
    out = editing.refine_cross(p_src, p_tgt, plan)
    assert torch.equal(out[..., 10], p_src[..., 3])
    assert torch.equal(out[..., 4], p_tgt[..., 4])
    assert torch.equal(out[..., 20], p_src[..., 20])


def test_blend_mask_is_the_pooled_hot_spot_upsampled():
    # One layer, one head, a 4x4 map grid (latent 16x16): the word's attention peaks at cell (1, 2).
    mask = one_hot_spot_mask((4, 4), (1, 2), (16, 16))
    # 3x3 max-pool spreads the peak to rows 0-2, cols 1-3; nearest upsampling x4 makes 12x12 pixels.
    expected = torch.zeros(16, 16)
    expected[0:12, 4:16] = 1
    assert torch.equal(mask, expected)


def test_blend_mask_sums_over_calls():
    state = editing.BlendState()
    a = torch.full((1, 16, 77), 0.01)
    a[0, 0, 5] = 1.0
    b = torch.full((1, 16, 77), 0.01)
    b[0, 15, 5] = 1.0
    for p in (a, b):
        state.start_call()
        state.add(p)
    plan = editing.EditPlan(torch.arange(77), torch.ones(77), [5], calls=2, threshold=0.5)
    mask = editing.blend_mask(state, plan, (16, 16))[0, 0]
    assert mask[0, 0] == 1 and mask[15, 15] == 1 and mask[0, 15] == 0


def test_local_blend_keeps_source_outside_the_mask_exactly():
    x = torch.randn(2, 4, 8, 8)
    mask = (torch.rand(1, 1, 8, 8) > 0.5).float()
    out = editing.local_blend(x, mask)
    assert torch.equal(out[0], x[0])
    inside = mask[0, 0].bool()
    assert torch.equal(out[1][:, ~inside], x[0][:, ~inside])
    assert torch.allclose(out[1][:, inside], x[1][:, inside], atol=1e-6)


def test_step_counts_that_start_far_below_pure_noise_are_named():
    from blip_diffusion.blip_core.schedule import steps_problem

    # leading spacing: first timestep (1000 // n) * (n - 1); 334 -> 2 * 333 = 666, 400 -> 798, 600 -> 599
    for fine in (2, 9, 10, 25, 50, 100, 150, 200, 250, 333, 500, 999, 1000):
        assert steps_problem(fine) is None, fine
    for n, first, fewer in ((167, 830, 166), (201, 800, 200), (334, 666, 333), (400, 798, 333), (600, 599, 500)):
        message = steps_problem(n)
        assert f"starting at timestep {first} of 1000" in message and f"use {fewer} steps instead" in message
    assert "use at least 2" in steps_problem(1)


def test_ddim_takes_at_most_999_steps():
    assert editing.ddim_timesteps(999)[0] == 999
    with pytest.raises(editing.EditError, match="at most 999 steps"):
        editing.ddim_timesteps(1000)


def test_ddim_timesteps_are_sd15s():
    assert editing.ddim_timesteps(50)[:3] == [981, 961, 941] and editing.ddim_timesteps(50)[-1] == 1


def test_inverse_step_undoes_the_ddim_step_for_the_same_eps():
    ac = alphas_cumprod(dtype=torch.float64)
    x, eps = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.randn(1, 4, 8, 8, dtype=torch.float64)
    a_low, a_high = float(ac[21]), float(ac[41])
    down = editing.ddim_step(editing.inverse_ddim_step(x, eps, a_low, a_high), eps, a_high, a_low)
    assert torch.allclose(down, x, atol=1e-10)
    # and the inverse step is DDIM's closed form: x at a_high = sqrt(a_high) x0 + sqrt(1 - a_high) eps
    x0 = (x - math.sqrt(1 - a_low) * eps) / math.sqrt(a_low)
    up = editing.inverse_ddim_step(x, eps, a_low, a_high)
    assert torch.allclose(up, math.sqrt(a_high) * x0 + math.sqrt(1 - a_high) * eps, atol=1e-10)


def test_inversion_then_ddim_reconstructs_when_eps_depends_on_t_only():
    ac = alphas_cumprod()
    ts = editing.ddim_timesteps(10)
    table = {t: torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(t)) for t in ts}
    x = torch.randn(1, 4, 8, 8)
    inverted = editing.invert(lambda xx, t: table[t], x, ts, ac)
    back = editing.edit_ddim(lambda xx, t, call: table[t], inverted, ts, ac, lambda call, xx: xx)
    assert (back - x).abs().max() < 1e-4
    assert (inverted - x).abs().max() > 0.5   # it did move


def test_plms_edit_loop_matches_plain_plms_when_nothing_blends():
    from blip_diffusion.blip_core import pndm

    ac = alphas_cumprod()
    x = torch.randn(1, 4, 8, 8)

    def eps(xx, t, call=None):
        return torch.tanh(xx) * (1 + t / 1000)

    calls = []
    ours = editing.edit_plms(eps, x, 6, ac, lambda c, xx: calls.append(c) or xx)
    plain = pndm.sample_plms(lambda xx, t: eps(xx, t), x, pndm.pndm_timesteps(6), ac)
    assert torch.allclose(ours, plain, atol=1e-6)
    assert calls == list(range(7))   # steps + 1 calls, as diffusers' PNDM makes them


def test_a_long_strip_is_cut_to_its_centre_without_resizing_all_of_it():
    # Subject Edit Photo's resize + centre crop (torchvision's Resize(size) + CenterCrop(size)). A 64:1 strip
    # at 2048 px would be resized to 131072x2048 first; only its centre is kept, so only that is resized:
    # the result is the full resize's centre (here exactly), and a 3000x1 line no longer runs out of memory.
    import numpy as np
    from PIL import Image

    from blip_diffusion.blip_core.preprocess import resize_center_crop

    strip = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 1024, 3), dtype=np.uint8))
    size = 32
    full = strip.resize((2048, size), Image.BILINEAR)   # short side -> 32, long side 1024 * 32 / 16
    expected = np.asarray(full.crop((1008, 0, 1040, size))).astype(int)   # centre: round((2048 - 32) / 2)
    got = np.asarray(resize_center_crop(strip, size, Image.BILINEAR)).astype(int)
    assert got.shape == (size, size, 3) and np.abs(got - expected).max() <= 1
    line = resize_center_crop(Image.new("RGB", (3000, 1), (10, 20, 30)), 512, Image.BILINEAR)
    assert line.size == (512, 512) and np.asarray(line).reshape(-1, 3).tolist()[0] == [10, 20, 30]

"""Host glue for subject-driven editing: the edit's attention patches, its two-branch guider and
its samplers, on the host's own model patcher, guider and sampler classes. The rules are in
blip_core.editing; this module only places them in the host's UNet and sampling loop.
"""
from __future__ import annotations

import logging
import math

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import comfy.ldm.modules.attention as host_attention

from ..blip_core import editing, regions
from ..blip_core.schedule import alphas_cumprod, leading_timesteps, steps_problem
from . import host_models

log = logging.getLogger("blip_diffusion")


# -- the model ------------------------------------------------------------------------------------
def check_model(model) -> None:
    """The edit's DDIM steps are written for SD1.5's epsilon-prediction schedule and its UNet: say so clearly."""
    sampling = model.get_model_object("model_sampling")
    table = getattr(sampling, "sigmas", None)
    ours = ((1 - alphas_cumprod().double()) / alphas_cumprod().double()).sqrt()
    eps = comfy.model_sampling.EPS
    # exactly epsilon prediction: the host's x0 and v patches are subclasses of EPS
    predicts_eps = isinstance(sampling, eps) and all(
        getattr(type(sampling), f) is getattr(eps, f) for f in ("calculate_input", "calculate_denoised", "noise_scaling"))
    if (not predicts_eps or table is None or table.shape != ours.shape
            or not torch.allclose(table.double().cpu(), ours, rtol=1e-4)):
        raise editing.EditError(
            "subject editing needs the BLIP-Diffusion UNet (an SD 1.5 noise-prediction model with its 1000-step "
            f"schedule); the connected model samples as {type(sampling).__name__}: connect the MODEL from Load "
            "BLIP-Diffusion, without sampling patches (ModelSamplingDiscrete other than eps, ModelSamplingSD3, "
            "ModelSamplingFlux)")
    unet_config = host_models.unet_config(model)
    if unet_config.get("context_dim", 768) != 768 or unet_config.get("adm_in_channels") is not None:
        raise editing.EditError(
            f"subject editing needs the BLIP-Diffusion UNet (SD 1.5: 768-wide text, no extra conditioning); the "
            f"connected one is a {type(model.model).__name__} reading {unet_config.get('context_dim')}-wide text: "
            "connect the MODEL from Load BLIP-Diffusion")


def check_latent(samples: torch.Tensor, node: str) -> None:
    if samples.ndim != 4 or samples.shape[1] != 4:
        raise editing.EditError(
            f"{node} needs an SD 1.x latent (4 channels, shape (1, 4, height/8, width/8)), got shape "
            f"{tuple(samples.shape)}: encode the photo with the BLIP-Diffusion VAE (VAE Encode after Subject Edit "
            "Photo), or use Empty Latent Image")


def block_names(model) -> list[tuple[str, int]]:
    """Every UNet block that may hold a transformer, as the host names them in its patches."""
    unet = model.model.diffusion_model
    names = [("input", i) for i in range(len(getattr(unet, "input_blocks", [])))]
    names += [("middle", 0)]
    names += [("output", i) for i in range(len(getattr(unet, "output_blocks", [])))]
    return names


def host_attention_fn(q, k, v, extra):
    return host_attention.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"))


class EditAttention:
    """The host's attention everywhere; explicit probabilities only on the conditional source and
    target rows of the layers the edit acts on at this call, and for the blend maps."""

    def __init__(self, plan: editing.EditPlan):
        self.plan = plan
        self.call = 0
        self.blend = editing.BlendState()

    def start_call(self, call: int) -> None:
        self.call = call
        self.blend.start_call()

    @staticmethod
    def pair_rows(batch: int, extra) -> tuple[int, int] | None:
        """(source, target) row indices of the conditional chunk of this UNet batch, if it has one."""
        chunks = list(extra.get("cond_or_uncond", [0]))
        if 0 not in chunks:
            return None
        per = batch // len(chunks)
        if per != 2:
            raise editing.EditError(f"the edit runs two branches per batch, got {per}: do not change its batch")
        s = chunks.index(0) * per
        return s, s + 1

    def self_attention(self, q, k, v, extra):
        out = host_attention_fn(q, k, v, extra)
        rows = self.pair_rows(q.shape[0], extra)
        if rows is None or not (self.plan.self_active(self.call)
                                and editing.self_replace_layer(q.shape[1], extra["original_shape"][-2:])):
            return out
        s, t = rows
        heads = extra["n_heads"]
        p_src = editing.attention_probs(q[s:s + 1], k[s:s + 1], heads)
        out[t:t + 1] = editing.apply_probs(p_src, v[t:t + 1], heads)
        return out

    def cross_attention(self, q, k, v, extra):
        out = host_attention_fn(q, k, v, extra)
        rows = self.pair_rows(q.shape[0], extra)
        if rows is None:
            return out
        blend = editing.blend_layer(q.shape[1], extra["original_shape"][-2:], extra["block"][0] == "middle")
        refine = self.plan.cross_active(self.call)
        if not (blend or refine):
            return out
        s, t = rows
        heads = extra["n_heads"]
        idx = [s, t] if refine else [s]
        p = editing.attention_probs(q[idx], k[idx], heads)
        if blend:
            self.blend.add(p[0])
        if refine:
            p_tgt = editing.refine_cross(p[0], p[1], self.plan)
            out[t:t + 1] = editing.apply_probs(p_tgt[None], v[t:t + 1], heads)
        return out

    def patch(self, model):
        """A clone of ``model`` with this object in every transformer's attention (input unchanged)."""
        replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {})
        if replaced.get("attn1") or replaced.get("attn2"):
            log.warning("Subject Edit: the MODEL already replaces attention in %d block(s) (another node's patch); "
                        "the edit puts its own attention there, so that patch does not apply during the edit",
                        len(replaced.get("attn1", {})) + len(replaced.get("attn2", {})))
        m = model.clone()
        for name, number in block_names(model):
            m.set_model_attn1_replace(self.self_attention, name, number)
            m.set_model_attn2_replace(self.cross_attention, name, number)
        return m


# -- guiding and sampling -------------------------------------------------------------------------
class EditGuider(comfy.samplers.CFGGuider):
    """Both branches in one batch with the host's conditioning batcher; the target is guided
    (cfg), the source guided too when generating, unguided when reconstructing a photo (LAVIS)."""

    def __init__(self, model_patcher, guide_source: bool):
        super().__init__(model_patcher)
        self.guide_source = guide_source

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        uncond = self.conds.get("negative") if self.cfg != 1.0 else None
        cond_pred, uncond_pred = comfy.samplers.calc_cond_batch(
            self.inner_model, [self.conds.get("positive"), uncond], x, timestep, model_options)
        if uncond is None:
            return cond_pred
        out = uncond_pred + (cond_pred - uncond_pred) * self.cfg
        if not self.guide_source:
            out[0] = cond_pred[0]
        return out


def _eps_fn(model_wrap, extra_args, before=None):
    """eps(x, t) in diffusers' scale from the host's x0 prediction at the table's exact sigma."""
    table = model_wrap.inner_model.model_sampling.sigmas

    def eps(x_vp, t, call=None):
        s = float(table[t])
        x_ve = x_vp * math.sqrt(1.0 + s * s)
        if before is not None:
            before(call)
        denoised = model_wrap(x_ve, x_vp.new_full((x_vp.shape[0],), s), **extra_args)
        return (x_ve - denoised) / s

    return eps


class InversionSampler(comfy.samplers.Sampler):
    """LAVIS's DDIM inversion: the clean latent walked up the DDIM timesteps."""

    def __init__(self, steps: int):
        self.steps = steps

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        eps = _eps_fn(model_wrap, extra_args)
        ts = editing.ddim_timesteps(self.steps)
        pbar = comfy.utils.ProgressBar(len(ts))

        def on_step(i, x):
            comfy.model_management.throw_exception_if_processing_interrupted()
            pbar.update(1)

        return editing.invert(lambda x, t: eps(x, t), latent_image + noise, ts, alphas_cumprod(), callback=on_step)


class EditSampler(comfy.samplers.Sampler):
    """The edit's loop: DDIM from an inverted photo, or PLMS from noise (generate, then edit),
    with LocalBlend after every UNet call. ``x`` arrives as the start latent in diffusers' scale
    (latent_image + noise, both prepared by the node)."""

    def __init__(self, attention: EditAttention, steps: int, from_photo: bool, region: torch.Tensor | None = None):
        self.attention, self.steps, self.from_photo = attention, steps, from_photo
        self.region = region  # (H, W) in [0, 1]: where the user allows a change, or None
        self.mask = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        x = latent_image + noise
        hw = tuple(x.shape[-2:])
        eps = _eps_fn(model_wrap, extra_args, before=self.attention.start_call)
        calls = self.steps if self.from_photo else self.steps + 1
        pbar = comfy.utils.ProgressBar(calls)

        def after_call(call, x):
            self.mask = editing.blend_mask(self.attention.blend, self.attention.plan, hw)
            if self.region is not None:
                self.mask = self.mask * regions.cover(self.region, hw).to(self.mask)
            comfy.model_management.throw_exception_if_processing_interrupted()
            pbar.update(1)
            return editing.local_blend(x, self.mask)

        if self.from_photo:
            return editing.edit_ddim(eps, x, editing.ddim_timesteps(self.steps), alphas_cumprod(), after_call)
        return editing.edit_plms(eps, x, self.steps, alphas_cumprod(), after_call)


def sigmas_at(model, timesteps) -> torch.Tensor:
    """The host's sigmas at integer timesteps (what its patches see as ``sample_sigmas``)."""
    table = model.get_model_object("model_sampling").sigmas.float().cpu()
    return table[list(timesteps)]


def run_inversion(model, positive, latent: torch.Tensor, steps: int, seed: int = 0) -> torch.Tensor:
    """The host LATENT (1, 4, h, w) of a photo -> the inverted latent, host scale."""
    check_model(model)
    check_latent(latent, "Subject Edit Invert")
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, positive)
    guider.set_cfg(1.0)
    ts = editing.ddim_timesteps(steps)
    return guider.sample(torch.zeros_like(latent), latent, InversionSampler(steps), sigmas_at(model, ts[::-1]),
                         seed=seed)


def run_edit(model, prompts, plan: editing.EditPlan, start: torch.Tensor, from_photo: bool, steps: int,
             cfg: float, seed: int, region: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both branches from ``start`` (host LATENT, one row): (latents (2, 4, h, w) host scale, mask (1, 1, h, w)).

    ``region`` (H, W) restricts the local blend: a place changes only where both the blend words'
    attention and the region allow it.

    From a photo, ``start`` is the inverted latent; otherwise a scene is generated from the
    seed's noise (the host's noise for that seed, shared by both branches, as LAVIS does).
    """
    check_model(model)
    check_latent(start, "Subject Edit")
    attention = EditAttention(plan)
    guider = EditGuider(attention.patch(model), guide_source=not from_photo)
    guider.set_conds(prompts.positive, prompts.negative)
    guider.set_cfg(cfg)
    sampler = EditSampler(attention, steps, from_photo, region)
    pair = start.expand(2, -1, -1, -1).contiguous()
    if from_photo:
        noise, image = torch.zeros_like(pair), pair
        ts = editing.ddim_timesteps(steps)
    else:
        problem = steps_problem(steps)
        if problem:
            raise editing.EditError(f"generating the scene: {problem}")
        noise = comfy.sample.prepare_noise(start[:1], seed).expand(2, -1, -1, -1).contiguous()
        image = torch.zeros_like(pair)
        ts = leading_timesteps(steps)
    latents = guider.sample(noise, image, sampler, sigmas_at(model, ts), seed=seed)
    return latents, sampler.mask


# -- the two prompts -------------------------------------------------------------------------------
class EditPrompts:
    """What the edit nodes pass along: the host conditionings of both branches and the negative,
    and the token facts the attention rules need (alignment, blend-word positions)."""

    def __init__(self, positive, negative, mapper, alphas, blend_positions, texts):
        self.positive, self.negative = positive, negative   # positive: rows (source, target)
        self.mapper, self.alphas, self.blend_positions, self.texts = mapper, alphas, blend_positions, texts

    def plan(self, calls: int, cross_replace: float, self_replace: float, threshold: float) -> editing.EditPlan:
        return editing.EditPlan(self.mapper, self.alphas, self.blend_positions, calls, cross_replace, self_replace,
                                threshold)


def _window(tok, ids: list[int], length: int) -> list[int]:
    """[BOS] ids [EOS] padded to ``length`` (the reference tokenizer's max_length padding)."""
    seq = [tok.start_token] + ids + [tok.end_token]
    return seq + [tok.pad_token] * (length - len(seq))


def build_prompts(clip, subject, source_subject: str, prompt: str, target_category: str, negative_prompt: str,
                  blend_words: str) -> EditPrompts:
    from ..blip_core.prompting import CONTEXT_LENGTH, SUBJECT_BEGIN
    from .host_clip import encode_spliced, sd1_tokenizer, text_width

    tok = sd1_tokenizer(clip)
    if text_width(clip) != subject.width:
        raise editing.EditError(f"the subject is {subject.width} wide but the connected CLIP is {text_width(clip)} "
                                "wide: connect the text encoder that belongs to the subject encoder's model")
    src_subject = " ".join((source_subject or "").split())
    if not src_subject:
        raise editing.EditError("source_subject is empty: name what the photo shows that the subject should "
                                "replace, e.g. 'dog'")
    tgt_subject = " ".join((target_category or "").split()) or subject.category
    src_text, tgt_text = editing.edit_texts(src_subject, tgt_subject, prompt, subject.tokens)
    hf = tok.tokenizer

    def ids(text):
        return hf(text, add_special_tokens=False)["input_ids"]

    src_ids, tgt_ids, neg_ids = ids(src_text), ids(tgt_text), ids(negative_prompt or "")
    room = CONTEXT_LENGTH - subject.tokens - 2
    if len(tgt_ids) > room:
        raise editing.EditError(
            f"the edit's target text '{tgt_text[:60]}...' takes {len(tgt_ids)} tokens and BLIP-Diffusion reads {room} "
            f"(its 16 placeholder words count too): shorten the prompt by {len(tgt_ids) - room} tokens")
    if len(neg_ids) > CONTEXT_LENGTH - 2:
        log.warning("Subject Edit Prompts: the negative prompt is longer than %d tokens and was cut",
                    CONTEXT_LENGTH - 2)
        neg_ids = neg_ids[:CONTEXT_LENGTH - 2]
    words = [w for w in (blend_words or src_subject).replace(",", " ").split()]
    pieces = [hf.decode([i]) for i in src_ids]
    found = {w: editing.word_positions(src_text, w, pieces, lambda word: len(ids(word))) for w in words}
    missing = [w for w in words if not found[w]]
    if missing:
        raise editing.EditError(f"blend word(s) {missing} are not words of the source prompt '{src_text}': the "
                                "local blend needs words the photo's description contains (usually the source "
                                "subject, e.g. 'dog')")
    positions = sorted({p for w in words for p in found[w]})
    mapper, alphas = editing.refinement_mapper([tok.start_token] + src_ids + [tok.end_token],
                                               [tok.start_token] + tgt_ids + [tok.end_token])
    src_cond, src_pooled = encode_spliced(clip, _window(tok, src_ids, CONTEXT_LENGTH), None)
    tgt_cond, _ = encode_spliced(clip, _window(tok, tgt_ids, room + 2), subject.embedding, at=SUBJECT_BEGIN)
    neg_cond, neg_pooled = encode_spliced(clip, _window(tok, neg_ids, CONTEXT_LENGTH), None)
    positive = [[torch.cat([src_cond, tgt_cond.to(src_cond.dtype)]), {"pooled_output": src_pooled}]]
    negative = [[neg_cond, {"pooled_output": neg_pooled}]]
    return EditPrompts(positive, negative, mapper, alphas, positions, (src_text, tgt_text))

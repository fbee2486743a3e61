"""Subject-driven editing as published (LAVIS ``BlipDiffusion.edit`` / ``generate_then_edit``).

Host-independent: token alignment, the attention rules of prompt-to-prompt's AttentionRefine
with LocalBlend, and the DDIM walks, as plain torch on tensors and callables.
LAVIS = salesforce/LAVIS, ``lavis/models/blip_diffusion_models/{blip_diffusion,ptp_utils}.py``.

The edit runs two branches in one batch, row 0 the *source* (``a {src} {prompt}``, no subject;
it reconstructs the photo) and row 1 the *target* (``a {16 x sks} {tgt} {prompt}`` with the
subject's 16 vectors inserted at position 2). In the conditional UNet rows:

* cross-attention of the target, for the first ``cross_replace`` of the steps: the target's
  probability at key j is the source's at ``mapper[j]`` where the token alignment matched j
  (``alphas[j] == 1``), its own elsewhere (AttentionRefine);
* self-attention of the target, for the first ``self_replace`` of the steps, on the layers at
  most 1/4 of the latent's side: the source's probabilities (16x16 and 8x8 at 512 px);
* after each step the target latent keeps its own values only where the source's
  cross-attention on the blend words (summed over all steps so far) exceeds ``threshold`` of
  its maximum (LocalBlend); elsewhere it takes the source branch's.

LAVIS fixes the layers by list position at 512 px (``down_cross[2:4] + up_cross[:3]``, maps
reshaped to 16x16; self-replacement where a map has at most 16**2 queries). We keep the same
layers at every size by their resolution relative to the latent: blend maps from the down and
up blocks' cross-attention two downsamplings below the latent, self-replacement there and below.
Each downsampling (a stride-2 convolution) takes a side n to ceil(n / 2), so a 65-wide latent
has 17-wide maps there, not 65 / 4. For the released UNet at 512 px this selects exactly
LAVIS's layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .prompting import CONTEXT_LENGTH, SUBJECT_TOKENS
from .schedule import leading_timesteps

PLACEHOLDER = "sks"   # LAVIS writes one placeholder word per subject vector into the target text
BLEND_POOL = 3        # LocalBlend's max-pool window (k = 1)
WORD_PUNCTUATION = ".,;:!?\"'()[]{}"   # around a word, not part of it, when blend words are matched
MAP_DOWNSAMPLES = 2   # blend maps and self-replacement two UNet downsamplings below the latent (1/4 side)


class EditError(ValueError):
    """Bad input for an edit (shown to the user as is)."""


# -- prompts -------------------------------------------------------------------------------------
def edit_texts(src_subject: str, tgt_subject: str, prompt: str,
               subject_tokens: int = SUBJECT_TOKENS) -> tuple[str, str]:
    """(source, target) texts of LAVIS ``_build_prompts_edit``, with every run of whitespace made one
    space (LAVIS only strips the prompt): the tokenizer reads them the same either way, and the blend
    words are then found by the space-separated words."""
    placeholder = " ".join([PLACEHOLDER] * subject_tokens)
    prompt = " ".join(prompt.split())
    return f"a {src_subject} {prompt}", f"a {placeholder} {tgt_subject} {prompt}"


# -- token alignment (prompt-to-prompt's refinement mapper) --------------------------------------
def align(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """For each position of ``y``, the position of ``x`` it is aligned to, or -1.

    Global alignment (Needleman-Wunsch) with gap 0, match 1, mismatch -1; ties resolved as
    prompt-to-prompt does: a gap in ``x`` first, then a gap in ``y``, then the diagonal.
    """
    nx, ny = len(x), len(y)
    score = np.zeros((nx + 1, ny + 1), dtype=np.int64)
    move = np.zeros((nx + 1, ny + 1), dtype=np.int8)   # 1 left (y only), 2 up (x only), 3 diagonal
    move[0, 1:], move[1:, 0] = 1, 2
    for i in range(1, nx + 1):
        for j in range(1, ny + 1):
            left, up = score[i, j - 1], score[i - 1, j]
            diag = score[i - 1, j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(left, up, diag)
            score[i, j] = best
            move[i, j] = 1 if best == left else 2 if best == up else 3
    out: list[int] = []
    i, j = nx, ny
    while i > 0 or j > 0:
        m = move[i, j]
        if m == 3:
            i, j = i - 1, j - 1
            out.append(i)
        elif m == 1:
            j -= 1
            out.append(-1)
        else:
            i -= 1
    return out[::-1]


def refinement_mapper(src_ids: Sequence[int], tgt_ids: Sequence[int],
                      max_len: int = CONTEXT_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper, alphas) over the target's ``max_len`` key positions (LAVIS ``get_mapper``).

    ``src_ids``/``tgt_ids`` are the tokenizer's ids with BOS and EOS, unpadded. Positions
    past the target text map to themselves with alpha 1. As in LAVIS the target text is the
    one with the placeholder words, while the target's keys hold the subject vectors from
    position 2 on: the alignment is applied to the keys as computed, unshifted.
    """
    if len(tgt_ids) > max_len or len(src_ids) > max_len:
        raise EditError(f"the edit prompts take {len(src_ids)} and {len(tgt_ids)} tokens, more than the text "
                        f"encoder's {max_len}: shorten the prompt")
    pairs = align(list(src_ids), list(tgt_ids))
    mapper = torch.arange(max_len, dtype=torch.int64)
    alphas = torch.ones(max_len)
    mapper[:len(pairs)] = torch.tensor(pairs, dtype=torch.int64)
    alphas[:len(pairs)] = (mapper[:len(pairs)] != -1).float()
    return mapper, alphas


def word_positions(text: str, word: str, token_strings: Sequence[str],
                   count_tokens: Callable[[str], int] | None = None) -> list[int]:
    """Token positions (BOS = 0) of every occurrence of ``word`` among the space-separated
    words of ``text``: LAVIS ``get_word_inds``. ``token_strings`` are the decoded tokens of
    ``text`` without BOS/EOS, each as ``tokenizer.decode([id])`` gives it.

    Beyond LAVIS, which finds a word only when it is written exactly so: case does not matter
    (the tokenizer lower-cases), a word written with punctuation on it ("grass." for "grass")
    counts with the tokens of the word alone, and a '#' is kept (LAVIS strips it from tokens as
    BERT's '##'; in CLIP's tokens it is a character, and stripping it misaligned what follows).
    ``count_tokens(word)``, the tokenizer's count for one word, places the words by tokens instead
    of by decoded characters (LAVIS's way): a character CLIP spells with several byte tokens
    ('’', 'é', '犬') decodes to one '�' per token, and counting characters then drifts.
    """
    words = text.split(" ")
    word = word.lower()
    exact = {i for i, w in enumerate(words) if w.lower() == word}
    loose = {i for i, w in enumerate(words) if i not in exact and w.lower().strip(WORD_PUNCTUATION) == word}
    if not exact and not loose:
        return []
    spans = _word_spans(words, token_strings, count_tokens)
    return [i + 1 for k, (begin, end) in enumerate(spans) if k in exact or k in loose
            for i in range(begin, end) if k in exact or token_strings[i].strip(WORD_PUNCTUATION)]


def _word_spans(words: list[str], token_strings: Sequence[str],
                count_tokens: Callable[[str], int] | None) -> list[tuple[int, int]]:
    """[begin, end) token indices of each word (CLIP's tokens never span a space)."""
    if count_tokens is not None:
        counts = [count_tokens(w) if w else 0 for w in words]
        if sum(counts) == len(token_strings):
            ends = np.cumsum(counts).tolist()
            return [(e - c, e) for c, e in zip(counts, ends)]
    spans, begin, length, k = [], 0, 0, 0   # by decoded characters, as LAVIS counts
    for i, piece in enumerate(token_strings):
        length += len(piece)
        if k < len(words) and length >= len(words[k]):
            spans.append((begin, i + 1))
            begin, length, k = i + 1, 0, k + 1
    rest = len(words) - len(spans)   # tokens ran out: the last ones go to the word they began
    return spans + [(begin, len(token_strings))] * min(rest, 1) + [(len(token_strings),) * 2] * max(rest - 1, 0)


# -- the attention rules ------------------------------------------------------------------------
@dataclass
class EditPlan:
    """What the edit does at each UNet call: LAVIS's AttentionRefine + LocalBlend settings.

    ``calls`` is LAVIS's ``num_inference_steps`` (its controller counts UNet calls against it).
    """
    mapper: torch.Tensor            # (77,) source position for each target key position
    alphas: torch.Tensor            # (77,) 1 where the alignment matched
    blend_positions: list[int]      # source token positions of the blend words
    calls: int
    cross_replace: float = 0.8
    self_replace: float = 0.4
    threshold: float = 0.3

    def cross_active(self, call: int) -> bool:
        """LAVIS ``get_time_words_attention_alpha``: a table of calls + 1 rows, 1 up to int(f * rows)."""
        return call < int(self.cross_replace * (self.calls + 1))

    def self_active(self, call: int) -> bool:
        return 0 <= call < int(self.calls * self.self_replace)


def map_size(latent_hw: tuple[int, int], downsamples: int = MAP_DOWNSAMPLES) -> tuple[int, int]:
    """The (h, w) of the UNet's attention maps ``downsamples`` stride-2 levels below the latent."""
    h, w = latent_hw
    for _ in range(downsamples):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


def blend_layer(queries: int, latent_hw: tuple[int, int], in_middle: bool) -> bool:
    """Cross-attention layers whose maps make the blend mask (``map_size`` of the latent, not mid)."""
    return not in_middle and queries == math.prod(map_size(latent_hw))


def self_replace_layer(queries: int, latent_hw: tuple[int, int]) -> bool:
    return queries <= math.prod(map_size(latent_hw))


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, n, h*d) x (b, m, h*d) -> softmax probabilities (b, h, n, m) in float32."""
    b, n, hd = q.shape
    d = hd // heads
    qh = q.reshape(b, n, heads, d).transpose(1, 2).float()
    kh = k.reshape(b, k.shape[1], heads, d).transpose(1, 2).float()
    return torch.softmax((qh @ kh.transpose(-1, -2)) * d ** -0.5, dim=-1)


def apply_probs(p: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, h, n, m) probabilities x (b, m, h*d) values -> (b, n, h*d) in v's dtype."""
    b, m, hd = v.shape
    vh = v.reshape(b, m, heads, hd // heads).transpose(1, 2).float()
    return (p @ vh).transpose(1, 2).reshape(b, p.shape[2], hd).to(v.dtype)


def refine_cross(p_src: torch.Tensor, p_tgt: torch.Tensor, plan: EditPlan) -> torch.Tensor:
    """The target's cross-attention probabilities under AttentionRefine: (h, n, 77) each."""
    mapped = p_src[..., plan.mapper.to(p_src.device)]
    a = plan.alphas.to(p_src.device, p_src.dtype)
    return mapped * a + p_tgt * (1 - a)


@dataclass
class BlendState:
    """The source's cross-attention on the blend layers, summed over the calls so far (LAVIS's
    AttentionStore sums; the mask is normalised by its maximum, so a sum and a mean agree)."""
    sums: list[torch.Tensor] = field(default_factory=list)   # per blend layer (h, n, 77), call order
    _layer: int = 0

    def start_call(self) -> None:
        self._layer = 0

    def add(self, p_src: torch.Tensor) -> None:
        if self._layer < len(self.sums):
            self.sums[self._layer] = self.sums[self._layer] + p_src
        else:
            self.sums.append(p_src.clone())
        self._layer += 1


def blend_mask(state: BlendState, plan: EditPlan, latent_hw: tuple[int, int]) -> torch.Tensor:
    """LocalBlend's mask (1, 1, h, w) as 0/1 floats at the latent's size.

    LAVIS gives blend words for the source prompt only, so its target row of word weights is
    zero, normalises to NaN and never passes the threshold: the union it takes is the source's
    mask alone.
    """
    h, w = latent_hw
    hb, wb = map_size(latent_hw)
    if not state.sums or not plan.blend_positions:
        return torch.zeros(1, 1, h, w)
    words = torch.zeros(state.sums[0].shape[-1], device=state.sums[0].device)
    words[[p for p in plan.blend_positions if p < words.shape[0]]] = 1
    maps = torch.cat([s.reshape(-1, 1, hb, wb, s.shape[-1]) for s in state.sums], dim=0)  # (layers*h, 1, hb, wb, 77)
    maps = (maps * words).sum(-1).mean(0, keepdim=True)                                    # (1, 1, hb, wb)
    k = BLEND_POOL // 2
    mask = F.max_pool2d(maps, (BLEND_POOL, BLEND_POOL), (1, 1), padding=(k, k))
    mask = F.interpolate(mask, size=(h, w))
    mask = mask / mask.amax(dim=(2, 3), keepdim=True)
    return mask.gt(plan.threshold).float()


def local_blend(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row 1 keeps its values inside the mask and takes row 0's outside (LAVIS's expression)."""
    mask = mask.to(x.device, x.dtype)
    return x[:1] + mask * (x - x[:1])


# -- DDIM ---------------------------------------------------------------------------------------
def ddim_timesteps(steps: int, num_train_timesteps: int = 1000, offset: int = 1) -> list[int]:
    """The SD1.5 DDIMScheduler's timesteps ("leading", steps_offset 1; 50 steps: 981, ..., 1)."""
    try:
        ts = [t + offset for t in leading_timesteps(steps, num_train_timesteps)]
    except ValueError as err:
        raise EditError(str(err)) from None
    if ts[0] >= num_train_timesteps:   # the offset pushes the last of 1000 steps past the table
        raise EditError(f"DDIM takes at most {num_train_timesteps - offset} steps here, got {steps} (published: 50)")
    return ts


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float) -> torch.Tensor:
    """diffusers' DDIMScheduler.step with eta 0, in its order of operations."""
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps


def inverse_ddim_step(x: torch.Tensor, eps: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
    """LAVIS ``_noise_latent_step``'s ``backward_ddim`` after its alpha swap: from alpha_bar
    ``a_from`` (less noisy) to ``a_to`` (noisier) along ``eps``."""
    return math.sqrt(a_to) * ((a_from ** -0.5 - a_to ** -0.5) * x
                              + (math.sqrt(1 / a_to - 1) - math.sqrt(1 / a_from - 1)) * eps) + x


def invert(eps_fn: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, timesteps: Sequence[int],
           alphas_cumprod: torch.Tensor, final_alpha_cumprod: float | None = None,
           callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """LAVIS ``_ddim_inverse``: walk the clean latent up the DDIM timesteps (ascending).

    At timestep t the model is asked at t while x still sits one step lower (at t - ratio,
    or at ``final_alpha_cumprod`` = alpha_bar[0] for the first step), and x moves to t.
    ``timesteps`` are the DDIM ones, noisiest first, as ``ddim_timesteps`` gives them.
    """
    ts = list(timesteps)
    ratio = ts[0] - ts[1] if len(ts) > 1 else 1000
    final = float(alphas_cumprod[0]) if final_alpha_cumprod is None else float(final_alpha_cumprod)
    for i, t in enumerate(reversed(ts)):
        prev = t - ratio
        a_from = float(alphas_cumprod[prev]) if prev >= 0 else final
        x = inverse_ddim_step(x, eps_fn(x, t), a_from, float(alphas_cumprod[t]))
        if callback is not None:
            callback(i, x)
    return x


def edit_ddim(eps_fn: Callable[[torch.Tensor, int, int], torch.Tensor], x: torch.Tensor,
              timesteps: Sequence[int], alphas_cumprod: torch.Tensor,
              after_call: Callable[[int, torch.Tensor], torch.Tensor],
              final_alpha_cumprod: float | None = None) -> torch.Tensor:
    """DDIM down ``timesteps``; ``eps_fn(x, t, call)``; ``after_call(call, x) -> x`` (the blend)."""
    ts = list(timesteps)
    ratio = ts[0] - ts[1] if len(ts) > 1 else 1000
    final = float(alphas_cumprod[0]) if final_alpha_cumprod is None else float(final_alpha_cumprod)
    for call, t in enumerate(ts):
        prev = t - ratio
        a_prev = float(alphas_cumprod[prev]) if prev >= 0 else final
        x = ddim_step(x, eps_fn(x, t, call), float(alphas_cumprod[t]), a_prev)
        x = after_call(call, x)
    return x


def edit_plms(eps_fn: Callable[[torch.Tensor, int, int], torch.Tensor], x: torch.Tensor,
              steps: int, alphas_cumprod: torch.Tensor,
              after_call: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """diffusers' PNDMScheduler (skip_prk_steps, set_alpha_to_one=False) call by call, for LAVIS
    ``generate_then_edit``: steps + 1 UNet calls (the warm-up probe, then the restart from the
    stored sample, ..., a last call at t=0 whose step is the identity), ``after_call`` after each,
    the probe included, as LAVIS blends after every scheduler call."""
    from .pndm import _combine, plms_step, pndm_timesteps

    ts = pndm_timesteps(steps, len(alphas_cumprod))
    ratio = len(alphas_cumprod) // steps
    final = float(alphas_cumprod[0])

    def alpha(t: int) -> float:
        return float(alphas_cumprod[t]) if t >= 0 else final

    history: list[torch.Tensor] = []
    start = x
    for call, t in enumerate(ts):
        eps = eps_fn(x, t, call)
        if call == 0:
            history.append(eps)
            start, x = x, plms_step(x, eps, alpha(t), alpha(t - ratio))
        elif call == 1:
            x = plms_step(start, (eps + history[-1]) / 2, alpha(t + ratio), alpha(t))
        else:
            history = (history + [eps])[-4:]
            x = plms_step(x, _combine(history), alpha(t), alpha(t - ratio))
        x = after_call(call, x)
    return x


"""How BLIP-Diffusion turns a prompt and a subject into the text encoder's input.

The published recipe: amplify the prompt by repetition, tokenise to 77 - 16 = 61 ids
(truncating), and insert the 16 subject vectors right after ``[BOS, "a"]``. The fine-tune's
caption ``a {category}`` takes the same place around the subject, unamplified.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

CONTEXT_LENGTH = 77
SUBJECT_TOKENS = 16
SUBJECT_BEGIN = 2  # after BOS and "a"


def amplify_prompt(prompt: str, category: str, strength: float = 1.0, reps: int = 20) -> str:
    """``"a {category} {prompt}"`` repeated ``int(strength * reps)`` times, comma-joined."""
    one = f"a {category} {prompt.strip()}"
    if not math.isfinite(strength):
        raise ValueError(f"prompt_strength must be a finite number, got {strength}")
    count = int(strength * reps)
    if count < 1:
        raise ValueError(f"prompt_strength x prompt_reps must be at least 1 (got {strength} x {reps})")
    return ", ".join([one] * count)


@dataclass
class TokenLayout:
    """Ids around the subject: ``ids[:SUBJECT_BEGIN] + [subject] + ids[SUBJECT_BEGIN:]``.

    The one layout of the inference prompt (``layout_tokens``) and of the fine-tune caption
    (``caption_layout``).
    """
    ids: list[int]                  # CONTEXT_LENGTH - subject_tokens ids: BOS, text, EOS, then padding
    dropped_words: str = ""         # words of the first prompt copy that did not fit ("" if none)
    used: int = CONTEXT_LENGTH      # positions the published text encoder reads (the caption: fewer)


def layout_tokens(encode, decode, prompt: str, category: str, strength: float, reps: int,
                  bos: int, eos: int, pad: int, subject_tokens: int = SUBJECT_TOKENS) -> TokenLayout:
    """Tokenise the amplified prompt the way the reference does.

    ``encode(text) -> list[int]`` returns the tokenizer's ids without BOS/EOS; ``decode``
    inverts it. The reference pads and truncates to 61 ids with BOS first and EOS last.
    Repetitions beyond that window are cut by design; if the first copy itself is cut,
    the words it loses are reported.
    """
    room = CONTEXT_LENGTH - subject_tokens - 2
    if room < 2:
        raise ValueError(f"the subject has {subject_tokens} vectors, which leave the text encoder's {CONTEXT_LENGTH} "
                         f"positions no room for the prompt (BLIP-Diffusion subjects have {SUBJECT_TOKENS}): use a "
                         "subject made by a BLIP-Diffusion subject encoder")
    body = encode(amplify_prompt(prompt, category, strength, reps))[:room]
    seq = [bos] + body + [eos]
    seq += [pad] * (CONTEXT_LENGTH - subject_tokens - len(seq))
    single = encode(f"a {category} {prompt.strip()}")
    dropped = decode(single[room:]).strip() if len(single) > room else ""
    return TokenLayout(seq, dropped, CONTEXT_LENGTH)


def caption_layout(caption_ids: list[int], bos: int, eos: int, pad: int,
                   subject_tokens: int = SUBJECT_TOKENS) -> TokenLayout:
    """The fine-tune caption: ``[BOS] caption [EOS]`` for a subject spliced in at SUBJECT_BEGIN, padded
    for a CONTEXT_LENGTH-slot CLIP; ``used`` counts the caption's ids and the subject's tokens (the
    published fine-tune neither amplifies nor pads). Raises the fine-tune's FinetuneError if it does not fit.
    """
    seq = [bos] + list(caption_ids) + [eos]
    used = len(seq) + subject_tokens
    if used > CONTEXT_LENGTH:
        from .finetune import FinetuneError  # the fine-tune's own error; prompting itself stays torch-free

        raise FinetuneError(f"the caption takes {len(seq)} tokens; with the {subject_tokens} subject vectors that "
                            f"exceeds the text encoder's {CONTEXT_LENGTH} positions: use a shorter category")
    return TokenLayout(seq + [pad] * (CONTEXT_LENGTH - subject_tokens - len(seq)), "", used)

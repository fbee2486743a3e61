"""Subject strength and schedule: how much of the subject a conditioning carries, and for how long.

Both are built from the one subject-free counterpart of a subject prompt: the same token ids with the
subject's 16 vectors left out (``a teapot on a beach, a teapot ...`` cut where the subject prompt is
cut), padded to the full context like any text prompt.

Strength blends the two encodings row by row. To blend like with like, the subject-free rows are put
into the subject prompt's order: BOS and "a" stay first, the 16 padding rows that the subject-free
prompt has at its end take the subject's 16 slots, and every word row lands on the same word's row of
the subject prompt. The UNet's cross-attention reads the context as a set (no positions), so this
reordered subject-free conditioning renders as the subject-free prompt itself. The blend
``free + s (subject - free)`` is then the subject prompt at s = 1, the text alone at s = 0, and an
extrapolation away from the text above 1 (the host's prompt weights above 1 move a token the same way,
away from its empty-prompt encoding).

The schedule is the host's own timestep ranges (what ConditioningSetTimestepRange writes): the subject
conditioning for ``start_percent`` 0 to ``end``, the subject-free one from ``end`` to 1.

Plain torch; no ComfyUI import.
"""
from __future__ import annotations

import torch

from .prompting import CONTEXT_LENGTH, SUBJECT_BEGIN, SUBJECT_TOKENS

PUBLISHED_STRENGTH = 1.0
MAX_STRENGTH = 2.0


def subject_free_ids(layout_ids: list[int], pad: int, context_length: int = CONTEXT_LENGTH) -> list[int]:
    """The subject prompt's ids (``TokenLayout.ids``: everything but the subject) padded to the context."""
    ids = list(layout_ids)
    if len(ids) > context_length:
        raise ValueError(f"{len(ids)} ids do not fit a context of {context_length}")
    return ids + [pad] * (context_length - len(ids))


def aligned_order(context_length: int = CONTEXT_LENGTH, begin: int = SUBJECT_BEGIN,
                  tokens: int = SUBJECT_TOKENS) -> list[int]:
    """Row ``i`` of the result is row ``order[i]`` of the subject-free encoding: its last ``tokens`` rows
    (padding, since the subject-free ids are the ``context_length - tokens`` layout ids plus padding) move
    into the subject's slots at ``begin``, every other row keeps its token's place in the subject prompt."""
    text = context_length - tokens
    return list(range(begin)) + list(range(text, context_length)) + list(range(begin, text))


def align_free(free: torch.Tensor, begin: int = SUBJECT_BEGIN, tokens: int = SUBJECT_TOKENS) -> torch.Tensor:
    """The subject-free encoding (batch, context, width) in the subject prompt's row order."""
    order = torch.tensor(aligned_order(free.shape[1], begin, tokens), device=free.device)
    return free.index_select(1, order)


def blend(subject: torch.Tensor, free_aligned: torch.Tensor, strength: float) -> torch.Tensor:
    """``free + strength (subject - free)``: exactly ``subject`` at 1 and ``free_aligned`` at 0 (whatever the
    subject)."""
    if subject.shape != free_aligned.shape:
        raise ValueError(f"subject conditioning {tuple(subject.shape)} and subject-free conditioning "
                         f"{tuple(free_aligned.shape)} differ in shape")
    if not 0.0 <= strength <= MAX_STRENGTH:
        raise ValueError(f"subject_strength must be between 0 and {MAX_STRENGTH}, got {strength}")
    if strength == PUBLISHED_STRENGTH:
        return subject
    return torch.lerp(free_aligned, subject.to(free_aligned.dtype), float(strength))


def scheduled(subject_entry: list, free_entry: list, end: float) -> list[list]:
    """The conditioning list that uses ``subject_entry`` ([cond, extras]) until ``end`` of the sampling
    (the host's percent of the noise schedule) and ``free_entry`` after: both with ``start_percent`` and
    ``end_percent``, as ConditioningSetTimestepRange sets them. ``end`` 1 or 0 give the one entry alone."""
    if not 0.0 <= end <= 1.0:
        raise ValueError(f"subject_end must be between 0 and 1, got {end}")
    if end >= 1.0:
        return [subject_entry]
    if end <= 0.0:
        return [free_entry]
    (cond, extras), (free, free_extras) = subject_entry, free_entry
    return [[cond, {**extras, "start_percent": 0.0, "end_percent": float(end)}],
            [free, {**free_extras, "start_percent": float(end), "end_percent": 1.0}]]

"""The one reach into the host's CLIP: its SD 1.x tokenizer, its width, and the subject splice.

BLIP-Diffusion puts the subject's 16 vectors into the text encoder's input in place of tokens
(``blip_core/prompting.py``: the ids around the subject). The host's CLIP takes such input as
token-weight pairs in which a pair's first item may be an embedding instead of an id; the pairs
are built here once, for SubjectConditioning and for the fine-tune's training text.
"""
from __future__ import annotations

import torch

from ..blip_core import prompting, subject_strength
from ..blip_core.prompting import SUBJECT_BEGIN, SUBJECT_TOKENS, TokenLayout


def sd1_tokenizer(clip):
    """The host's CLIP-L tokenizer of an SD 1.x CLIP, or a clear error for any other CLIP."""
    tok = getattr(clip, "tokenizer", None)
    if getattr(tok, "clip_name", None) == "l" and hasattr(tok, "clip_l"):
        return tok.clip_l
    encoders = sorted(k for k in vars(tok) if k.startswith("clip_") and k != "clip_name") if tok else []
    raise ValueError(
        "BLIP-Diffusion subjects: this node needs an SD 1.x CLIP (a single CLIP-L text encoder, 768 wide), as "
        "loaded by Load BLIP-Diffusion or by CLIPLoader with type 'stable_diffusion'; the connected CLIP "
        f"({type(tok).__name__}, encoders {encoders}) cannot take BLIP-Diffusion subjects (SD2, SDXL, SD3 and "
        "Flux CLIPs are not supported).")


def text_width(clip) -> int:
    """The width of an SD 1.x CLIP's token embeddings (other CLIPs are refused as by sd1_tokenizer)."""
    sd1_tokenizer(clip)
    return clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.shape[1]


def prompt_layout(clip, prompt: str, category: str, strength: float, reps: int,
                  subject_tokens: int = SUBJECT_TOKENS) -> TokenLayout:
    """The inference prompt, amplified and tokenised by the host's tokenizer (prompting.layout_tokens)."""
    tok = sd1_tokenizer(clip)
    hf = tok.tokenizer

    def encode(text):
        return hf(text, add_special_tokens=False)["input_ids"]

    return prompting.layout_tokens(encode, hf.decode, prompt, category, strength, reps, bos=tok.start_token,
                                   eos=tok.end_token, pad=tok.pad_token, subject_tokens=subject_tokens)


def caption_layout(clip, caption: str, subject_tokens: int = SUBJECT_TOKENS) -> TokenLayout:
    """The fine-tune caption tokenised by the host's tokenizer (prompting.caption_layout)."""
    tok = sd1_tokenizer(clip)
    return prompting.caption_layout(tok.tokenizer(caption, add_special_tokens=False)["input_ids"],
                                    tok.start_token, tok.end_token, tok.pad_token, subject_tokens)


def token_pairs(layout_or_ids, embedding: torch.Tensor | None, at: int = SUBJECT_BEGIN) -> list[tuple]:
    """The host's token-weight pairs (weight 1): the ids with the subject's (16, D) vectors as one
    embedding item at position ``at``; ``embedding`` None: the plain ids."""
    ids = layout_or_ids.ids if isinstance(layout_or_ids, TokenLayout) else list(layout_or_ids)
    if embedding is None:
        return [(t, 1.0) for t in ids]
    if embedding.ndim == 3 and embedding.shape[0] == 1:
        embedding = embedding[0]
    if embedding.ndim != 2:
        raise ValueError(f"expected the subject's (tokens, width) vectors, got shape {tuple(embedding.shape)}")
    return [(t, 1.0) for t in ids[:at]] + [(embedding, 1.0)] + [(t, 1.0) for t in ids[at:]]


def encode_spliced(clip, layout_or_ids, embedding: torch.Tensor | None, at: int = SUBJECT_BEGIN,
                   return_pooled: bool = True):
    """The host CLIP's encode of the ids with the subject spliced in at ``at`` (``token_pairs``):
    ``clip.encode_from_tokens`` as CLIPTextEncode calls it, so (cond, pooled) with ``return_pooled``.
    The subject goes in as fp32, as the host's own token embeddings do, whatever the CLIP's dtype."""
    pairs = token_pairs(layout_or_ids, None if embedding is None else embedding.float(), at)
    return clip.encode_from_tokens({"l": [pairs]}, return_pooled=return_pooled)


def encode_subject_free(clip, layout: TokenLayout, subject_tokens: int = SUBJECT_TOKENS):
    """The subject prompt's counterpart without the subject: the layout's ids padded to the full context
    (subject_strength.subject_free_ids), encoded as ``encode_spliced`` encodes: (cond, pooled)."""
    ids = subject_strength.subject_free_ids(layout.ids, sd1_tokenizer(clip).pad_token, len(layout.ids) + subject_tokens)
    return encode_spliced(clip, ids, None)

"""bert-base-uncased WordPiece tokenizer for the Q-Former's category text.

A small self-contained implementation (no hub access, no transformers) of BERT's uncased
tokenisation: clean control characters, space out CJK ideographs, NFC, lower-case, strip
accents, split punctuation, then greedy longest-match WordPiece with ``##`` continuations.
Special tokens written literally in the text (``[CLS]``, ``[MASK]``, ...) are kept whole,
as BertTokenizer does. ``[DEC]`` is the token BLIP-2 adds (id 30522, one past the vocabulary).
"""
from __future__ import annotations

import functools
import os
import re
import unicodedata

import torch

VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bert-base-uncased-vocab.txt")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
MAX_CHARS_PER_WORD = 100


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    # All non-alphanumeric printable ASCII counts as punctuation, as in BERT.
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _basic_tokens(text: str) -> list[str]:
    chars = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        if _is_whitespace(ch):
            chars.append(" ")
        elif _is_cjk(cp):
            chars.append(f" {ch} ")
        else:
            chars.append(ch)
    words = []
    for word in unicodedata.normalize("NFC", "".join(chars)).split():
        word = unicodedata.normalize("NFD", word.lower())
        word = "".join(ch for ch in word if unicodedata.category(ch) != "Mn")
        current = ""
        for ch in word:
            if _is_punctuation(ch):
                words += [current, ch] if current else [ch]
                current = ""
            else:
                current += ch
        if current:
            words.append(current)
    return words


class BertTokenizer:
    def __init__(self, vocab_file: str = VOCAB_FILE):
        with open(vocab_file, encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
        self.vocab = {tok: i for i, tok in enumerate(tokens)}
        self.vocab.setdefault("[DEC]", len(tokens))
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self._special = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > MAX_CHARS_PER_WORD:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            if end == start:  # no piece matches: the whole word is unknown
                return [self.unk_id]
            start = end
        return ids

    def tokenize_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without [CLS]/[SEP]."""
        ids = []
        for part in self._special.split(text):
            if part in SPECIAL_TOKENS:
                ids.append(self.vocab[part])
            else:
                for word in _basic_tokens(part):
                    ids += self._wordpiece(word)
        return ids

    def encode(self, text: str) -> list[int]:
        return [self.cls_id] + self.tokenize_ids(text) + [self.sep_id]

    def __call__(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (N, L) int64, right-padded with [PAD] to the longest."""
        seqs = [self.encode(t) for t in ([texts] if isinstance(texts, str) else texts)]
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return ids, mask


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> BertTokenizer:
    """The shipped bert-base-uncased vocabulary plus [DEC], loaded once."""
    return BertTokenizer()

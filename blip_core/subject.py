"""The SUBJECT value passed between nodes: a subject embedding and what it came from."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Subject:
    embedding: torch.Tensor          # (1, 16, 768), float32 on CPU
    category: str                    # the source category the encoder saw ("dog")
    meta: dict = field(default_factory=dict)   # encoder hash, image hashes, how it was made

    def __post_init__(self):
        if self.embedding.ndim != 3 or self.embedding.shape[0] != 1:
            raise ValueError(f"a subject embedding must have shape (1, tokens, width), got {tuple(self.embedding.shape)}")

    @property
    def width(self) -> int:
        return self.embedding.shape[-1]

    @property
    def tokens(self) -> int:
        return self.embedding.shape[1]

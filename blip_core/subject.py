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


def weights_fingerprint(state_dict: dict) -> str:
    """A cheap content hash of a model's weights: names, shapes and a strided sample of values.

    Hashing every byte of a 2 GB encoder costs seconds at each load; a sample of ~1/4099 of
    the values still tells different weights apart, which is what subject files need.
    """
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach()
        h.update(f"{name}{tuple(t.shape)}".encode())
        flat = t.reshape(-1)[::4099].to("cpu", torch.float32)
        h.update(flat.numpy().tobytes())
    return h.hexdigest()[:16]

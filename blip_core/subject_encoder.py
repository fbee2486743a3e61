"""BLIP-Diffusion subject encoder: (reference image, category word) -> 16 x 768 subject embedding.

ViT features of the image, a Q-Former whose 16 learned queries read them (conditioned on
the category text), and a projection into the CLIP text-embedding space. The module tree
mirrors the released ``qformer/`` weights, so ``state_dict()`` keys are the released ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from .bert_tokenizer import default_tokenizer
from .preprocess import preprocess
from .qformer import ProjLayer, QFormerConfig, QFormerEmbeddings, QFormerEncoder
from .vision import VisionConfig, VisionTransformer


def _pick(cls, values: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names and v is not None}


@dataclass
class SubjectEncoderConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    num_query_tokens: int = 16

    @classmethod
    def from_dict(cls, d: dict) -> "SubjectEncoderConfig":
        """From the released ``qformer/config.json`` (or :meth:`to_dict`'s output).

        Absent values take transformers' defaults for the released config classes where
        those matter (vision LayerNorm eps 1e-6, Q-Former eps 1e-12).
        """
        vision = VisionConfig(**_pick(VisionConfig, d.get("vision_config", {})))
        qformer = QFormerConfig(**_pick(QFormerConfig, d.get("qformer_config", {})))
        if d.get("qformer_config", {}).get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported in the Q-Former")
        return cls(vision, qformer, int(d.get("num_query_tokens", 16)))

    def to_dict(self) -> dict:
        return {"vision_config": dataclasses.asdict(self.vision),
                "qformer_config": dataclasses.asdict(self.qformer),
                "num_query_tokens": self.num_query_tokens}

    @property
    def max_text_tokens(self) -> int:
        """Longest tokenised category, [CLS] and [SEP] included.

        Only text tokens take position embeddings (the query tokens have none), so the limit
        is the whole position table, not the table minus the queries.
        """
        return self.qformer.max_position_embeddings


class SubjectEncoder(nn.Module):
    def __init__(self, config: SubjectEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or SubjectEncoderConfig()
        self.visual_encoder = VisionTransformer(config.vision)
        self.embeddings = QFormerEmbeddings(config.qformer)
        self.encoder = QFormerEncoder(config.qformer)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer.hidden_size))
        width = config.qformer.hidden_size
        self.proj_layer = ProjLayer(width, 4 * width, eps=1e-12)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixels (B, 3, 224, 224), input_ids/attention_mask (B, L) or (1, L) -> (B, 16, 768)."""
        dtype = self.query_tokens.dtype
        image_feats = self.visual_encoder(pixels.to(self.query_tokens.device, dtype))
        batch = image_feats.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = input_ids.to(image_feats.device), attention_mask.to(image_feats.device)
        if input_ids.shape[0] == 1 and batch > 1:  # one category for every image
            input_ids, attention_mask = input_ids.expand(batch, -1), attention_mask.expand(batch, -1)
        if input_ids.shape[0] != batch:
            raise ValueError(f"{input_ids.shape[0]} token rows for {batch} images; give one row or one per image")
        n_query = self.query_tokens.shape[1]
        x = self.embeddings(input_ids, self.query_tokens)
        queries = torch.ones((batch, n_query), dtype=attention_mask.dtype, device=attention_mask.device)
        x = self.encoder(x, torch.cat([queries, attention_mask], dim=1), image_feats, n_query)
        return self.proj_layer(x[:, :n_query])

    def tokenize(self, category: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(category, str) or not category.strip():
            raise ValueError("the subject category is blank: give a word such as 'dog'")
        ids, mask = default_tokenizer()(category)
        if ids.shape[1] <= 2:
            raise ValueError(f"the subject category {category!r} contains no text tokens")
        if ids.shape[1] > self.config.max_text_tokens:
            raise ValueError(f"the subject category is too long: {ids.shape[1]} tokens with [CLS]/[SEP], "
                             f"the Q-Former allows at most {self.config.max_text_tokens}")
        return ids, mask

    @torch.no_grad()
    def encode(self, images: torch.Tensor, category: str, weights=None, preprocessing: str = "diffusers",
               chunk: int = 8) -> torch.Tensor:
        """Subject embedding of one subject shown in ``images`` (B, H, W, C float [0, 1]).

        Each image is encoded with the same category; the result is the mean over images, or
        the weighted mean (``weights``: B non-negative numbers, normalised to sum 1), as LAVIS
        combines several reference images. ``preprocessing``: how the photos are brought to the
        encoder's size, one of ``preprocess.PREPROCESSING_STYLES``. Returns (1, 16, 768), float32
        whatever the model's dtype.
        """
        ids, mask = self.tokenize(category)
        pixels = preprocess(images, mode=preprocessing, size=self.config.vision.image_size)
        w = _normalised_weights(weights, pixels.shape[0])
        embeds = torch.cat([self(pixels[i:i + chunk], ids, mask) for i in range(0, pixels.shape[0], chunk)])
        w = w.to(embeds.device, torch.float32)[:, None, None]
        return (w * embeds.float()).sum(0, keepdim=True)  # fp32: a half-precision mean would round it again


def _normalised_weights(weights, count: int) -> torch.Tensor:
    if weights is None:
        return torch.full((count,), 1.0 / count, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != count:
        raise ValueError(f"got {w.numel()} weights for {count} images; give one weight per image")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"image weights must be finite and non-negative, got {w.tolist()}")
    if w.sum() <= 0:
        raise ValueError("image weights must not all be zero")
    w = w / w.max()   # weights near the float limit would sum to inf
    return w / w.sum()

"""BERT-style Q-Former and projection layer of the BLIP-Diffusion subject encoder.

Learned query tokens (no position embedding) are prepended to the category text's
word+position embeddings. Self-attention runs over queries+text with the text padding
mask; cross-attention to the image features and the ``*_query`` FFN apply to query
positions only, while text positions use the plain FFN (their states feed the next
layer's self-attention, so they matter even though only query outputs are returned).
Module names follow the released ``qformer/`` weights. No dropout: the encoder is frozen and
in eval mode in every published use (inference and subject fine-tuning alike).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .vision import activation, quick_gelu

# The reference adds (1 - mask) * -10000 to the scores (BERT's convention). In fp32 exp(-1e4)
# underflows to 0, so -inf or a bool mask give bitwise the same result; kept for fidelity.
MASKED_SCORE = -10000.0


@dataclass
class QFormerConfig:
    vocab_size: int = 30523
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 1
    encoder_hidden_size: int = 1024
    hidden_act: str = "gelu"


class QFormerEmbeddings(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, query_tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        text = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        queries = query_tokens.expand(input_ids.shape[0], -1, -1)
        return self.LayerNorm(torch.cat([queries, text.to(queries.dtype)], dim=1))


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(context)), self._heads(self.value(context))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).flatten(2)


class AttentionOutput(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class AttentionBlock(nn.Module):
    """Post-LN attention: LayerNorm(x + dense(attention(x, context)))."""

    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.attention = MultiHeadAttention(cfg, kv_width)
        self.output = AttentionOutput(cfg)

    def forward(self, x, context=None, mask=None):
        return self.output(self.attention(x, x if context is None else context, mask), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class FFNOutput(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.attention = AttentionBlock(cfg, cfg.hidden_size)
        if index % cfg.cross_attention_frequency == 0:
            self.crossattention = AttentionBlock(cfg, cfg.encoder_hidden_size)
        self.intermediate = Intermediate(cfg)
        self.output = FFNOutput(cfg)
        self.intermediate_query = Intermediate(cfg)
        self.output_query = FFNOutput(cfg)

    def forward(self, x, mask, image_feats, num_queries: int):
        x = self.attention(x, mask=mask)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if hasattr(self, "crossattention"):
            queries = self.crossattention(queries, context=image_feats)
        out = self.output_query(self.intermediate_query(queries), queries)
        if text.shape[1]:
            out = torch.cat([out, self.output(self.intermediate(text), text)], dim=1)
        return out


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers))

    def forward(self, x, attention_mask, image_feats, num_queries: int):
        """x: (B, Q+L, D) embeddings; attention_mask: (B, Q+L) with 1 = attend, 0 = padding."""
        mask = (1.0 - attention_mask.to(x.dtype))[:, None, None, :] * MASKED_SCORE
        for layer in self.layer:
            x = layer(x, mask, image_feats, num_queries)
        return x


class ProjLayer(nn.Module):
    """x + dense2(QuickGELU(dense1(LayerNorm(x)))): maps Q-Former outputs into CLIP text space."""

    def __init__(self, width: int = 768, hidden: int = 3072, eps: float = 1e-12):
        super().__init__()
        self.dense1 = nn.Linear(width, hidden)
        self.dense2 = nn.Linear(hidden, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dense2(quick_gelu(self.dense1(self.LayerNorm(x))))

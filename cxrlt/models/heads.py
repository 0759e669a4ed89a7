"""Query-decoder heads (ML-Decoder style: one query per label, cross-attention, no query self-attention).

`learned`: a learned query and a learned output vector per label, as CheXFusion published.
`text`: queries are a learned projection of frozen label-text embeddings and ONE output projection is
shared by every label, so a label never seen in training can still be scored from its text.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class QueryHead(nn.Module):
    def __init__(self, d_model: int, num_labels: int, heads: int, ff_dim: int, dropout: float,
                 query: str = "learned", label_embeddings: torch.Tensor | None = None):
        super().__init__()
        if query not in ("learned", "text"):
            raise ValueError(f"query must be 'learned' or 'text', not {query!r}")
        self.query = query
        if query == "learned":
            self.queries = nn.Parameter(torch.randn(num_labels, d_model) * 0.02)
            self.out_weight = nn.Parameter(torch.randn(num_labels, d_model) * d_model ** -0.5)
            self.out_bias = nn.Parameter(torch.zeros(num_labels))
        else:
            if label_embeddings is None or label_embeddings.shape[0] != num_labels:
                raise ValueError("text queries need label_embeddings of shape [num_labels, dim]")
            # frozen, stored with the weights: serving the trained labels needs no text encoder
            self.register_buffer("label_embeddings", label_embeddings.detach().float().clone())
            self.query_proj = nn.Sequential(nn.Linear(label_embeddings.shape[1], d_model), nn.GELU(),
                                            nn.Linear(d_model, d_model))
            self.out = nn.Linear(d_model, 1)
        self.cross = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.norm_q, self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_dim, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor, label_embeddings: torch.Tensor | None = None):
        """tokens [B, N, d], pad [B, N] (True = ignore) -> logits [B, L]."""
        b = tokens.shape[0]
        if self.query == "learned":
            if label_embeddings is not None:
                raise ValueError("a learned-query head cannot score new label texts; train a text-query variant")
            q = self.queries
        else:
            q = self.query_proj(self.label_embeddings if label_embeddings is None else label_embeddings.to(tokens))
        q = self.norm_q(q).unsqueeze(0).expand(b, -1, -1)
        attn, _ = self.cross(q, tokens, tokens, key_padding_mask=pad, need_weights=False)
        h = self.norm1(q + self.drop(attn))
        h = self.norm2(h + self.drop(self.ff(h)))
        if self.query == "learned":
            return (h * self.out_weight).sum(-1) + self.out_bias
        return self.out(h).squeeze(-1)

"""Study-level token fusion: per-view tokens, a true 2-D positional encoding, slot and view-type
embeddings, and a batch-first transformer encoder whose key-padding mask really masks empty slots.

(CheXFusion's public code fed batch-first tensors to a sequence-first encoder, computed its padding mask
after filling the slots and encoded only one spatial axis; none of that is repeated here.)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def sincos_2d(d: int, h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """2-D sinusoidal encoding [h*w, d]: half the channels encode the row, half the column."""
    if d % 4:
        raise ValueError(f"d_model must be divisible by 4 for a 2-D sin/cos encoding, got {d}")
    quarter = d // 4
    freq = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    rows = torch.arange(h, device=device, dtype=torch.float32)[:, None] * freq  # [h, d/4]
    cols = torch.arange(w, device=device, dtype=torch.float32)[:, None] * freq  # [w, d/4]
    row_enc = torch.cat([rows.sin(), rows.cos()], 1)[:, None, :].expand(h, w, d // 2)
    col_enc = torch.cat([cols.sin(), cols.cos()], 1)[None, :, :].expand(h, w, d // 2)
    return torch.cat([row_enc, col_enc], -1).reshape(h * w, d).to(dtype or torch.float32)


class ViewTokenizer(nn.Module):
    """Backbone feature map [N, C, h, w] -> tokens [N, T, d] with positional encoding.

    stride 1: a 1x1 projection (stage 1); stride 2: a 3x3 stride-2 convolution (CheXFusion stage 2,
    32x32 -> 16x16 tokens per view at 1024 px).
    """

    def __init__(self, in_channels: int, d_model: int, stride: int = 1):
        super().__init__()
        k = 1 if stride == 1 else 3
        self.proj = nn.Conv2d(in_channels, d_model, kernel_size=k, stride=stride, padding=k // 2)
        self.d_model = d_model

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.proj(feats)
        n, d, h, w = x.shape
        pos = sincos_2d(d, h, w, device=x.device, dtype=x.dtype)
        return x.flatten(2).transpose(1, 2) + pos


class StudyFusion(nn.Module):
    """Adds slot and view-type embeddings and runs a transformer over all tokens of a study."""

    def __init__(self, d_model: int, max_views: int, layers: int, heads: int, ff_dim: int,
                 dropout: float, slot_embedding: bool = True, view_embedding: bool = True):
        super().__init__()
        self.slot_embed = nn.Parameter(torch.zeros(max_views, d_model)) if slot_embedding else None
        self.view_embed = nn.Embedding(3, d_model) if view_embedding else None
        if self.slot_embed is not None:
            nn.init.trunc_normal_(self.slot_embed, std=0.02)
        if self.view_embed is not None:
            nn.init.trunc_normal_(self.view_embed.weight, std=0.02)
        self.encoder = None
        if layers > 0:
            layer = nn.TransformerEncoderLayer(d_model, heads, ff_dim, dropout, batch_first=True, norm_first=True)
            # nested tensors would drop padded positions differently per batch composition: keep dense
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor, view_mask: torch.Tensor, view_types: torch.Tensor):
        """tokens [B, V, T, d] -> (fused tokens [B, V*T, d], key padding mask [B, V*T], True = ignore)."""
        b, v, t, d = tokens.shape
        if self.slot_embed is not None:
            tokens = tokens + self.slot_embed[:v][None, :, None, :]
        if self.view_embed is not None:
            tokens = tokens + self.view_embed(view_types)[:, :, None, :]
        tokens = tokens.reshape(b, v * t, d)
        pad = (~view_mask)[:, :, None].expand(b, v, t).reshape(b, v * t)
        if self.encoder is not None:
            tokens = self.encoder(tokens, src_key_padding_mask=pad)
        return tokens, pad

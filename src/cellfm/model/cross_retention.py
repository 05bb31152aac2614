"""Cross-retention: a small set of query vectors reads a cell's gene tokens (official
`CrossRetentionLayer` of retention.py, used by the annotation model).

Queries and gates come from the query set x (B, Q, D); keys and values from the tokens y (B, L, D).
Same kernel as the encoder's retention (relu feature maps, O = Q (K^T V), head RMS norm, SiLU gate),
but, as in the official layer, no 1/sqrt(length) scale on V and a plain (not DeepNorm) residual.
Cost O((Q + L) d^2): the Q x L matrix is never formed. Knows tensors only.
"""

from __future__ import annotations

import torch
from torch import nn

from cellfm.model.retention import GatedLinearUnit, MultiHeadRetention


class CrossRetention(MultiHeadRetention):
    """Retention of x over y; with y=None it is self-retention of x (no key mask, no V scale)."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, y: torch.Tensor | None = None, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x (B, Q, D) queries and gates; y (B, L, D) keys/values; key_mask (B, L), 0 = not a key
        return super().forward(x if y is None else y, key_mask, None, queries=x)  # (B, Q, D)


class CrossRetentionLayer(nn.Module):
    """x <- LN(x + self-retention(x)); x <- LN(x + cross-retention(x, y)); x <- LN(x + GLU(x))."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, eps: float = 1e-7) -> None:
        super().__init__()
        self.attn1 = CrossRetention(d_model, n_heads)
        self.attn2 = CrossRetention(d_model, n_heads)
        self.ffn = GatedLinearUnit(d_model)
        self.dropout = nn.Dropout(dropout)
        self.post_norm1 = nn.LayerNorm(d_model, eps=eps)
        self.post_norm2 = nn.LayerNorm(d_model, eps=eps)
        self.post_norm3 = nn.LayerNorm(d_model, eps=eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official init: Xavier-normal gain 1 on every projection (no depth scaling here)."""
        for m in (self.attn1, self.attn2, self.ffn):
            for lin in m.children():
                nn.init.xavier_normal_(lin.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        # x (B, Q, D), y (B, L, D), key_mask (B, L) -> (B, Q, D)
        x = self.post_norm1(x + self.dropout(self.attn1(x)))
        x = self.post_norm2(x + self.dropout(self.attn2(x, y, key_mask)))
        return self.post_norm3(x + self.dropout(self.ffn(x)))

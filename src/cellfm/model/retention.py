"""The ERetNet layer: bidirectional linear retention + GLU, DeepNorm post-norm residuals.

Retention per head: O = relu(Q)/sqrt(hd) @ ((relu(K)/sqrt(hd) * key_mask)^T @ (V * len_scale)),
then O / ||O / sqrt(hd)|| (a weightless RMS norm), gated by SiLU(U). Cost O(L * d^2): the L x L
matrix is never formed, so a cell of 16k genes costs 8x a cell of 2k genes.

The `*_packed` methods take cells one after another in one (N, D) stream, no padding: every
per-token op runs on N real tokens and each cell's Kᵀ·V is the sum over its own segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cellfm.model.lora import LoRALinear


def head_rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Official SRMSNorm: x / max(||x / sqrt(dim)||_2, 1e-12), computed in fp32."""
    dtype = x.dtype
    x = x.float()
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True) * x.shape[-1] ** -0.5
    return (x / norm.clamp_min(1e-12)).to(dtype)


class MultiHeadRetention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, lora_rank: int = 0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = LoRALinear(d_model, d_model, lora_rank)
        self.k_proj = LoRALinear(d_model, d_model, lora_rank)
        self.v_proj = LoRALinear(d_model, d_model, lora_rank)
        self.u_proj = LoRALinear(d_model, d_model, lora_rank)
        self.o_proj = LoRALinear(d_model, d_model, lora_rank)

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None,
        len_scale: torch.Tensor | None,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x (B, T, D) gives keys and values; key_mask (B, T) float, 0 removes a token from the keys;
        # len_scale (B,) scales V (None: no scale, as the official cross-retention). `queries`
        # (B, S, D), default x: the rows whose output is wanted (Q, U and the output projection run
        # on these only; the cell embedding needs just the CLS row, cross-retention its query set).
        B, T, D = x.shape
        xq = x if queries is None else queries
        S = xq.shape[1]
        h, hd = self.n_heads, self.head_dim
        scale = hd**-0.5
        q = F.relu(self.q_proj(xq)).view(B, S, h, hd).transpose(1, 2) * scale  # (B, h, S, hd)
        k = F.relu(self.k_proj(x)) * scale  # (B, T, D)
        if key_mask is not None:
            k = k * key_mask.unsqueeze(-1)
        k = k.view(B, T, h, hd).transpose(1, 2)  # (B, h, T, hd)
        v = self.v_proj(x)
        if len_scale is not None:
            v = v * len_scale.view(B, 1, 1)
        v = v.view(B, T, h, hd).transpose(1, 2)  # (B, h, T, hd)
        kv = k.transpose(-1, -2) @ v  # (B, h, hd, hd)
        o = head_rms_norm(q @ kv)  # (B, h, S, hd)
        u = F.silu(self.u_proj(xq)).view(B, S, h, hd).transpose(1, 2)
        o = (o * u).transpose(1, 2).reshape(B, S, D)
        return self.o_proj(o)  # (B, S, D)

    def forward_packed(self, x: torch.Tensor, seg: Segments, cls_only: bool = False) -> torch.Tensor:
        """Retention of packed cells, x (N, D) laid out by `seg`, every token a key. Returns (N, D),
        or with `cls_only` the CLS row of each cell only (B, D)."""
        N, D = x.shape
        h, hd = self.n_heads, self.head_dim
        scale = hd**-0.5
        k = (F.relu(self.k_proj(x)) * scale).view(N, h, hd)  # (N, h, hd)
        v = (self.v_proj(x) * seg.v_scale).view(N, h, hd)  # (N, h, hd)
        kv = seg.kv(k, v)  # (B, h, hd, hd)
        xq = x[seg.rows] if cls_only else x  # (S, D)
        S = xq.shape[0]
        q = (F.relu(self.q_proj(xq)) * scale).view(S, h, hd)  # (S, h, hd)
        if cls_only:
            o = (q.unsqueeze(2) @ kv).squeeze(2)  # (B, h, 1, hd) @ (B, h, hd, hd) -> (B, h, hd)
        else:
            o = seg.apply(q, kv)  # (N, h, hd): every token queries its own cell's kv
        o = head_rms_norm(o)
        u = F.silu(self.u_proj(xq)).view(S, h, hd)
        return self.o_proj((o * u).reshape(S, D))  # (S, D)


@dataclass
class Segments:
    """Where the cells are in a packed (N, D) token stream: cell b owns the next lengths[b] rows.

    Kᵀ·V is a sum over a cell's own rows. Without `slots` it runs as one small matmul per cell (no
    padding at all, best on CPU); with `slots` (N,) = b * width + position, K and V are laid into a
    (B, width) grid for one batched matmul (a few kernels whatever B, for GPUs). Only this O(d·hd)
    per-token term sees the grid; the O(d²) projections and GLU run on the N real tokens.
    """

    lengths: list[int]
    v_scale: torch.Tensor  # (N, 1) each token's V factor: its cell's length scale
    rows: torch.Tensor  # (B,) each cell's first row (its CLS)
    slots: torch.Tensor | None = None
    width: int = 0

    def _grid(self, t: torch.Tensor) -> torch.Tensor:
        # t (N, h, hd) -> (B, h, width, hd), zeros where a cell is shorter than width
        B, h, hd = len(self.lengths), t.shape[1], t.shape[2]
        grid = t.new_zeros(B * self.width, h, hd).index_copy_(0, self.slots, t)
        return grid.view(B, self.width, h, hd).transpose(1, 2)

    def kv(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """k, v (N, h, hd) -> per cell sum_t k_t v_t^T (B, h, hd, hd)."""
        if self.slots is not None:
            return self._grid(k).transpose(-1, -2) @ self._grid(v)
        pairs = zip(k.split(self.lengths), v.split(self.lengths), strict=True)
        return torch.stack([kb.permute(1, 2, 0) @ vb.transpose(0, 1) for kb, vb in pairs])

    def apply(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """q (N, h, hd), kv (B, h, hd, hd) -> q_t @ kv[cell of t] (N, h, hd)."""
        if self.slots is not None:
            o = (self._grid(q) @ kv).transpose(1, 2)  # (B, width, h, hd)
            return o.reshape(-1, *q.shape[1:])[self.slots]
        pairs = zip(q.split(self.lengths), kv, strict=True)
        return torch.cat([(qb.transpose(0, 1) @ kv_b).transpose(0, 1) for qb, kv_b in pairs])


class GatedLinearUnit(nn.Module):
    """o = W_o((W_u x) * (W_v x)): bias-free, no activation (official GatedLinearUnit)."""

    def __init__(self, d_model: int, lora_rank: int = 0) -> None:
        super().__init__()
        self.u_proj = LoRALinear(d_model, d_model, lora_rank)
        self.v_proj = LoRALinear(d_model, d_model, lora_rank)
        self.o_proj = LoRALinear(d_model, d_model, lora_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.u_proj(x) * self.v_proj(x))


class RetentionLayer(nn.Module):
    """x <- LN(alpha x + drop(retention(x))); x <- LN(alpha x + drop(GLU(x)))."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        alpha: float,
        dropout: float = 0.0,
        lora_rank: int = 0,
        eps: float = 1e-7,
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.attn = MultiHeadRetention(d_model, n_heads, lora_rank)
        self.ffn = GatedLinearUnit(d_model, lora_rank)
        self.dropout = nn.Dropout(dropout)
        self.post_norm1 = nn.LayerNorm(d_model, eps=eps)
        self.post_norm2 = nn.LayerNorm(d_model, eps=eps)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, len_scale: torch.Tensor
    ) -> torch.Tensor:
        x = self.post_norm1(x * self.alpha + self.dropout(self.attn(x, key_mask, len_scale)))
        x = self.post_norm2(x * self.alpha + self.dropout(self.ffn(x)))
        return x

    def forward_first_row(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, len_scale: torch.Tensor
    ) -> torch.Tensor:
        """The layer's output for row 0 (CLS) only, (B, 1, D): every token still gives keys and
        values, but queries, gate, output projection, GLU and norms run on one row, so a last
        layer costs 2 d^2 per token instead of 8 d^2. Equal to `forward(...)[:, :1]`."""
        first = x[:, :1]  # (B, 1, D)
        y = self.post_norm1(first * self.alpha + self.dropout(self.attn(x, key_mask, len_scale, first)))
        return self.post_norm2(y * self.alpha + self.dropout(self.ffn(y)))

    def forward_packed(self, x: torch.Tensor, seg: Segments, cls_only: bool = False) -> torch.Tensor:
        """`forward` on packed cells, x (N, D) laid out by `seg`; with `cls_only` only each cell's
        CLS row (B, D), as `forward_first_row`."""
        first = x[seg.rows] if cls_only else x
        attn = self.attn.forward_packed(x, seg, cls_only)
        y = self.post_norm1(first * self.alpha + self.dropout(attn))
        return self.post_norm2(y * self.alpha + self.dropout(self.ffn(y)))

"""The classification head of cell type annotation, and temperature scaling.

The official annotation model (tutorials/CellAnnotation) learns one embedding per cell type and
scores a cell two ways: the CLS output dotted with each type embedding, and type-embedding queries
cross-attending to the gene tokens; the two cross-entropies (class-weighted) are summed. We keep the
first, cheaper path, which works on cached CLS embeddings as well: a residual MLP on the normalised
CLS output, then a dot product with learned type embeddings. The token path is left out so that the
frozen mode can train on embeddings computed once.
"""

from __future__ import annotations

import torch
from torch import nn


class AnnotationHead(nn.Module):
    """CLS embedding (B, D) -> logits (B, C) against learned cell type embeddings."""

    def __init__(self, d_model: int, n_classes: int, hidden: int | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        hidden = hidden or max(2 * d_model, 64)
        # per-dimension standardisation of the CLS input, set from the reference cells: encoder
        # outputs (a random-init one especially) share a large common offset that hides the cells'
        # differences from a LayerNorm
        self.register_buffer("in_mean", torch.zeros(d_model))
        self.register_buffer("in_std", torch.ones(d_model))
        self.norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_model)
        )
        self.class_emb = nn.Parameter(torch.randn(n_classes, d_model) * d_model**-0.5)  # (C, D)
        self.bias = nn.Parameter(torch.zeros(n_classes))

    @torch.no_grad()
    def set_input_scale(self, emb: torch.Tensor) -> None:
        """Standardise inputs with the mean / std of these embeddings (N, D)."""
        self.in_mean.copy_(emb.mean(0))
        self.in_std.copy_(emb.std(0).clamp_min(1e-6))

    def features(self, cls_emb: torch.Tensor) -> torch.Tensor:
        x = self.norm((cls_emb - self.in_mean) / self.in_std)
        return x + self.mlp(x)  # (B, D)

    def forward(self, cls_emb: torch.Tensor) -> torch.Tensor:
        return self.features(cls_emb) @ self.class_emb.T + self.bias  # (B, C)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 200) -> float:
    """The T > 0 minimising validation NLL of softmax(logits / T) (Guo et al. 2017).

    One scalar, so the argmax (and accuracy) never changes; only confidences are calibrated.
    """
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([log_t], lr=0.05)
    logits, labels = logits.detach().float(), labels.long()
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        opt.step()
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """ECE: |accuracy - confidence| averaged over equal-width confidence bins, weighted by size."""
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    ece = torch.zeros(())
    edges = torch.linspace(0, 1, n_bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.float().mean() * (correct[sel].mean() - conf[sel].mean()).abs()
    return float(ece)

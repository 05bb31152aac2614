"""Output heads: gene-wise value decoder and cell-wise decoder (official ValueDecoder and
CellwiseDecoder). Both predict the log-normalised value of each token; the cell-wise one only
from the CLS embedding, which is what forces the cell embedding to summarise the cell.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# MindSpore's nn.LeakyReLU default slope is 0.2 (PyTorch's is 0.01); the official weights were
# trained with 0.2, so it is part of the model, not a detail.
LEAKY_SLOPE = 0.2


class ValueDecoder(nn.Module):
    """Per token: Linear(d, d) -> LeakyReLU(0.2) -> Linear(d, 1), bias-free."""

    def __init__(self, d_model: int, zero_head: bool = False) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_model, bias=False)
        self.w2 = nn.Linear(d_model, 1, bias=False)
        self.zero_logit = None
        if zero_head:  # official add_zero: probability that the gene is expressed at all
            self.zero_logit = nn.Sequential(
                nn.Linear(d_model, d_model), nn.LeakyReLU(LEAKY_SLOPE),
                nn.Linear(d_model, d_model), nn.LeakyReLU(LEAKY_SLOPE),
                nn.Linear(d_model, 1), nn.Sigmoid(),
            )

    def forward(self, token_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # token_emb (B, L, D) -> pred (B, L), zero_prob (B, L) or None
        pred = self.w2(F.leaky_relu(self.w1(token_emb), LEAKY_SLOPE)).squeeze(-1)
        zero_prob = None if self.zero_logit is None else self.zero_logit(token_emb).squeeze(-1)
        return pred, zero_prob


class CellwiseDecoder(nn.Module):
    """pred[b, g] = sigmoid(W gene_emb[b, g]) . cell_emb[b]."""

    def __init__(self, d_model: int, zero_head: bool = False) -> None:
        super().__init__()
        self.map = nn.Linear(d_model, d_model, bias=False)
        self.zero_logit = nn.Linear(d_model, d_model) if zero_head else None

    def forward(
        self, cell_emb: torch.Tensor, gene_emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # cell_emb (B, D), gene_emb (B, L, D) -> pred (B, L)
        query = torch.sigmoid(self.map(gene_emb))
        pred = (query @ cell_emb.unsqueeze(-1)).squeeze(-1)
        zero_prob = None
        if self.zero_logit is not None:
            zero_prob = torch.sigmoid((self.zero_logit(gene_emb) @ cell_emb.unsqueeze(-1)).squeeze(-1))
        return pred, zero_prob

"""Scalar encoders: a scalar -> a d-dimensional embedding by soft binning.

Official "FFN": x -> Linear(1, bins) -> LeakyReLU(0.2) -> w3(h) + a * h -> softmax over the bins
-> Linear(bins, d). `ValueEncoder` (official "ValueEncoder") embeds expression values this way and
gives hidden (masked) values a learned `mask_emb` instead; the ST tokens (`st_tokens.py`) embed a
cell's library sizes with a second `SoftBinEncoder`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cellfm.model.decoders import LEAKY_SLOPE


class SoftBinEncoder(nn.Module):
    def __init__(self, d_model: int, bins: int = 256) -> None:
        super().__init__()
        self.w1 = nn.Linear(1, bins, bias=False)
        self.w3 = nn.Linear(bins, bins, bias=False)
        self.a = nn.Parameter(torch.zeros(1, 1))  # learned skip weight, starts at 0
        self.table = nn.Linear(bins, d_model, bias=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        # x (B, L) -> (B, L, D)
        h = F.leaky_relu(self.w1(x.unsqueeze(-1)), LEAKY_SLOPE)  # (B, L, bins)
        h = torch.softmax(self.w3(h) + h * self.a, dim=-1)
        return self.table(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)


class ValueEncoder(SoftBinEncoder):
    def __init__(self, d_model: int, bins: int = 256) -> None:
        super().__init__(d_model, bins)
        self.mask_emb = nn.Parameter(torch.zeros(1, 1, d_model))

    def forward(self, values: torch.Tensor, hidden_mask: torch.Tensor | None = None) -> torch.Tensor:
        # values (B, L) -> (B, L, D)
        emb = self.embed(values)
        if hidden_mask is not None:
            keep = (~hidden_mask).unsqueeze(-1).to(emb.dtype)  # (B, L, 1)
            emb = emb * keep + self.mask_emb * (1 - keep)
        return emb

"""ST tokens: two tokens after CLS that tell the encoder a cell's library size (the authors'
`FinetuneModel`, tutorials/BatchIntegration/finetune_intergration_model.py).

    totals S (the counts the values were normalised by) and T (the cell's total count)
    -> features log1p([S, T] / 1000) (B, 2) -> soft-binning encoder (B, 2, D) + ST_emb (1, 2, D)

The official fine-tuning pipeline down-samples some cells' counts (then S < T, and the values are
normalised by S); at inference S = T. Only tensors here: the totals come with the batch.
"""

from __future__ import annotations

import torch
from torch import nn

from cellfm.model.value_encoder import SoftBinEncoder

N_ST_TOKENS = 2


def st_features(total: torch.Tensor, sampled_total: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) totals -> (B, 2) features log1p([S, T] / 1000), S = `sampled_total` or T (official
    `Prepare.cat_st`)."""
    sampled = total if sampled_total is None else sampled_total
    return torch.log1p(torch.stack([sampled, total], dim=-1).float() / 1000)


class STTokens(nn.Module):
    def __init__(self, d_model: int, bins: int = 256) -> None:
        super().__init__()
        self.emb = nn.Parameter(torch.zeros(1, N_ST_TOKENS, d_model))  # official ST_emb
        self.enc = SoftBinEncoder(d_model, bins)  # official ST_enc

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # MindSpore's XavierNormal(0.5) on (1, 2, D): fan_in = 2 D, fan_out = D
        nn.init.normal_(self.emb, std=0.5 * (2 / (3 * self.emb.shape[-1])) ** 0.5)

    def forward(self, st_feat: torch.Tensor) -> torch.Tensor:
        # st_feat (B, 2) -> (B, 2, D)
        return self.emb + self.enc(st_feat)

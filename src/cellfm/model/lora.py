"""LoRA: a low-rank trainable update beside a frozen bias-free linear layer.

As in the official `lora_block`: A has a normal init, B starts at zero (so a fresh adapter changes
nothing), the update is scaled by 1 and can be merged into the weight for inference.
"""

from __future__ import annotations

import torch
from torch import nn


class LoRALinear(nn.Module):
    """`y = x W^T + (x A^T) B^T`; the base weight keeps its official name `weight`."""

    def __init__(self, in_features: int, out_features: int, rank: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.rank = rank
        if rank > 0:
            self.lora_a = nn.Parameter(torch.empty(rank, in_features))
            self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
            nn.init.normal_(self.lora_a, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T
        if self.rank > 0:
            y = y + (x @ self.lora_a.T) @ self.lora_b.T
        return y

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold the adapter into `weight` and drop it (same outputs, plain linear cost)."""
        if self.rank == 0:
            return
        self.weight += self.lora_b @ self.lora_a
        del self.lora_a, self.lora_b
        self.rank = 0

    def extra_repr(self) -> str:
        out_f, in_f = self.weight.shape
        return f"in={in_f}, out={out_f}, lora_rank={self.rank}"

"""The one interface of cell type annotation heads, so that training, prediction and saving never
ask which head they hold.

A head reads encoder states (B, 1+L, D), CLS first, and the token mask (B, L). Heads that read only
the CLS vector say so (`reads_tokens = False`) so that callers can skip caching gene tokens.
"""

from __future__ import annotations

import torch
from torch import nn


class AnnotationHead(nn.Module):
    """Base of the annotation heads: prediction logits, training loss, a spec to rebuild it."""

    kind: str = ""
    reads_tokens: bool = False

    @property
    def n_classes(self) -> int:
        raise NotImplementedError

    def prepare(self, cls_emb: torch.Tensor) -> None:
        """Set input statistics from the training cells' CLS embeddings (N, D); default: nothing."""

    def logits(self, states: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Prediction logits (B, C)."""
        return self.logits_and_loss(states, token_mask)[0]

    def logits_and_loss(
        self,
        states: torch.Tensor,
        token_mask: torch.Tensor,
        y: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction logits (B, C), training loss or None without labels `y`)."""
        raise NotImplementedError

    def spec(self) -> dict:
        """Constructor arguments (and "kind") from which the same architecture is rebuilt."""
        raise NotImplementedError

"""The official CellFM annotation head (tutorials/CellAnnotation/annotation_model.py, `Net`),
on tensors only.

One learned embedding per cell type. The type embeddings, with the cell's CLS output in front,
form a query set of C + 1 vectors that reads the cell's gene tokens through two cross-retention
layers. Two scores per type:
- token path: a bias-free linear map of each type's query output -> (B, C) (the official
  prediction, `labelpred1`);
- CLS path: the updated CLS query dotted with the (input) type embeddings -> (B, C).
Training sums the class-weighted cross-entropies of both (`annotation_loss`); prediction reads the
token path, as the official model does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cellfm.model.annotation_head import AnnotationHead
from cellfm.model.cross_retention import CrossRetentionLayer


class CellTypeHead(AnnotationHead):
    kind = "official"
    reads_tokens = True

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_classes: int,
        dropout: float = 0.1,
        eps: float = 1e-7,
        n_layers: int = 2,
    ) -> None:
        super().__init__()
        self._args = dict(d_model=d_model, n_heads=n_heads, dropout=dropout, eps=eps, n_layers=n_layers)
        self.cluster_emb = nn.Parameter(torch.empty(n_classes, d_model))  # (C, D) type embeddings
        self.query_layer = nn.ModuleList(
            CrossRetentionLayer(d_model, n_heads, dropout, eps) for _ in range(n_layers)
        )
        self.classifier = nn.Linear(d_model, 1, bias=False)
        nn.init.xavier_normal_(self.cluster_emb, gain=0.5)

    @property
    def n_classes(self) -> int:
        return self.cluster_emb.shape[0]

    def forward(self, states: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states (B, L+1, D): encoder output, CLS first; token_mask (B, L): real gene tokens.

        Returns (token_logits, cls_logits), each (B, C).
        """
        cls, tokens = states[:, :1], states[:, 1:]  # (B, 1, D), (B, L, D)
        B = states.shape[0]
        types = self.cluster_emb.to(states.dtype)
        x = torch.cat([cls, types.expand(B, -1, -1)], dim=1)  # (B, 1+C, D)
        for layer in self.query_layer:
            x = layer(x, tokens, token_mask)
        token_logits = self.classifier(x[:, 1:]).squeeze(-1)  # (B, C)
        cls_logits = x[:, 0] @ types.T  # (B, C)
        return token_logits, cls_logits

    def logits_and_loss(self, states, token_mask, y=None, weight=None):
        token_logits, cls_logits = self(states, token_mask)
        loss = None if y is None else annotation_loss(token_logits, cls_logits, y, weight)
        return token_logits, loss

    def spec(self) -> dict:
        return {"kind": self.kind, "n_classes": self.n_classes, **self._args}


def annotation_loss(
    token_logits: torch.Tensor,
    cls_logits: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of the two class-weighted cross-entropies (weighted means), in float32 (official)."""
    return F.cross_entropy(token_logits.float(), labels, weight=weight) + F.cross_entropy(
        cls_logits.float(), labels, weight=weight
    )


__all__ = ["CellTypeHead", "annotation_loss"]

"""Annotation heads that read only the CLS vector; they train on cached cell embeddings.

- `ClsLinearHead`: standardised CLS -> linear map (multinomial logistic regression). Its weights are
  usually fitted by L-BFGS outside (`set_weights`), so it equals logistic regression on the
  model's own embeddings, the baseline an annotator must not lose to.
- `ClsMlpHead`: a residual MLP on the standardised CLS, scored against learned type embeddings
  (the CLS path of the official model, without its cross-attention).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cellfm.model.annotation_head import AnnotationHead


class _Standardised(AnnotationHead):
    """CLS input standardised per dimension with statistics of the reference cells: encoder outputs
    (a random-init one especially) share a large common offset that hides the cells' differences."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.register_buffer("in_mean", torch.zeros(d_model))
        self.register_buffer("in_std", torch.ones(d_model))

    @torch.no_grad()
    def prepare(self, cls_emb: torch.Tensor) -> None:
        self.in_mean.copy_(cls_emb.mean(0))
        self.in_std.copy_(cls_emb.std(0).clamp_min(1e-6))

    def standardise(self, cls_emb: torch.Tensor) -> torch.Tensor:
        return (cls_emb - self.in_mean) / self.in_std  # (B, D)

    def forward(self, cls_emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits_and_loss(self, states, token_mask, y=None, weight=None):
        logits = self(states[:, 0])  # (B, C)
        return logits, None if y is None else F.cross_entropy(logits.float(), y, weight=weight)


class ClsLinearHead(_Standardised):
    """Standardised CLS (B, D) -> logits (B, C)."""

    kind = "cls_linear"

    def __init__(self, d_model: int, n_classes: int) -> None:
        super().__init__(d_model)
        self.linear = nn.Linear(d_model, n_classes)

    @property
    def n_classes(self) -> int:
        return self.linear.out_features

    @torch.no_grad()
    def set_weights(self, coef: np.ndarray, intercept: np.ndarray) -> None:
        """Weights (C, D) and biases (C,) of a classifier fitted on standardised CLS vectors."""
        self.linear.weight.copy_(torch.as_tensor(coef, dtype=torch.float32))
        self.linear.bias.copy_(torch.as_tensor(intercept, dtype=torch.float32))

    def forward(self, cls_emb: torch.Tensor) -> torch.Tensor:
        return self.linear(self.standardise(cls_emb))

    def spec(self) -> dict:
        return {"kind": self.kind, "d_model": self.linear.in_features, "n_classes": self.n_classes}


class ClsMlpHead(_Standardised):
    """CLS embedding (B, D) -> logits (B, C) against learned cell type embeddings."""

    kind = "cls_mlp"

    def __init__(self, d_model: int, n_classes: int, hidden: int | None = None, dropout: float = 0.1) -> None:
        super().__init__(d_model)
        hidden = hidden or max(2 * d_model, 64)
        self.norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_model)
        )
        self.class_emb = nn.Parameter(torch.randn(n_classes, d_model) * d_model**-0.5)  # (C, D)
        self.bias = nn.Parameter(torch.zeros(n_classes))

    @property
    def n_classes(self) -> int:
        return self.class_emb.shape[0]

    def forward(self, cls_emb: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.standardise(cls_emb))
        x = x + self.mlp(x)  # (B, D)
        return x @ self.class_emb.T + self.bias  # (B, C)

    def spec(self) -> dict:
        return {"kind": self.kind, "d_model": self.class_emb.shape[1], "n_classes": self.n_classes,
                "hidden": self.mlp[0].out_features}

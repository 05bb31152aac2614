"""Building annotation heads by name or from a saved spec, fitting the linear CLS head, and the
per-feature standardisation of encoder states in front of a head (`StandardisedStates`).

Every head is an `cellfm.model.annotation_head.AnnotationHead`; nothing outside this module names
a head class."""

from __future__ import annotations

import numpy as np
import torch

from cellfm.config import ModelConfig
from cellfm.model.annotation_head import AnnotationHead
from cellfm.model.cell_type_head import CellTypeHead
from cellfm.model.cls_heads import ClsLinearHead, ClsMlpHead

HEAD_DROPOUT = 0.1  # official cfg.enc_dropout, used by the query layers
_CLASSES = {"official": CellTypeHead, "cls_linear": ClsLinearHead, "cls_mlp": ClsMlpHead}


STANDARDISED = "standardised_states"


class StandardisedStates(AnnotationHead):
    """`inner` reading encoder states standardised per feature: the CLS row with the CLS mean / sd,
    the gene tokens with the token mean / sd, both of the training cells (`set_statistics`).

    Outside the wrapped head, whose own forward is untouched (the official head keeps its parity
    with the authors' code). Encoder outputs carry large per-feature offsets shared by every cell
    (a random-init encoder's especially); the CLS linear head removes them by standardising, and
    the official head trained on the raw states fell below it (docs/annotation.md)."""

    def __init__(self, inner: AnnotationHead, d_model: int) -> None:
        super().__init__()
        self.inner = inner
        self.kind, self.reads_tokens = inner.kind, inner.reads_tokens
        for name, value in (("cls_mean", 0.0), ("cls_std", 1.0), ("tok_mean", 0.0), ("tok_std", 1.0)):
            self.register_buffer(name, torch.full((d_model,), value))

    @property
    def n_classes(self) -> int:
        return self.inner.n_classes

    @torch.no_grad()
    def set_statistics(self, cls_mean, cls_std, tok_mean, tok_std) -> None:
        """Per-feature (D,) means and sds of the training cells' CLS and gene-token states."""
        for name, v in (("cls_mean", cls_mean), ("cls_std", cls_std), ("tok_mean", tok_mean),
                        ("tok_std", tok_std)):
            v = torch.as_tensor(np.asarray(v), dtype=torch.float32)
            getattr(self, name).copy_(v.clamp_min(1e-6) if name.endswith("std") else v)

    def standardise(self, states: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """states (B, 1+L, D) -> the same, standardised; padding rows stay zero."""
        cls = (states[:, :1] - self.cls_mean) / self.cls_std  # (B, 1, D)
        tok = (states[:, 1:] - self.tok_mean) / self.tok_std  # (B, L, D)
        tok = tok * token_mask[..., None].to(tok.dtype)
        return torch.cat([cls, tok], dim=1).to(states.dtype)

    def forward(self, states: torch.Tensor, token_mask: torch.Tensor):
        return self.inner(self.standardise(states, token_mask), token_mask)

    def logits_and_loss(self, states, token_mask, y=None, weight=None):
        return self.inner.logits_and_loss(self.standardise(states, token_mask), token_mask, y, weight)

    def spec(self) -> dict:
        return {"kind": STANDARDISED, "d_model": int(self.cls_mean.shape[0]), "inner": self.inner.spec()}


def new_head(kind: str, config: ModelConfig, n_classes: int) -> AnnotationHead:
    """A fresh head of `kind` for an encoder of `config`."""
    if kind == "official":
        return CellTypeHead(config.d_model, config.n_heads, n_classes, HEAD_DROPOUT, config.layer_norm_eps)
    return _CLASSES[kind](config.d_model, n_classes)


def head_from_spec(spec: dict) -> AnnotationHead:
    """The head of `spec` (from `AnnotationHead.spec()`), weights not set."""
    if spec["kind"] == STANDARDISED:
        return StandardisedStates(head_from_spec(spec["inner"]), spec["d_model"])
    args = {k: v for k, v in spec.items() if k != "kind"}
    return _CLASSES[spec["kind"]](**args)


def fit_linear_head(
    head: ClsLinearHead, cls_train: np.ndarray, y_train: np.ndarray, balanced: bool, seed: int
) -> ClsLinearHead:
    """Multinomial logistic regression (L-BFGS, L2, C=1) on the standardised CLS vectors of the
    training cells, copied into `head`: deterministic and free of learning-rate or epoch choices."""
    from sklearn.linear_model import LogisticRegression

    head.prepare(torch.from_numpy(cls_train))
    z = head.standardise(torch.from_numpy(cls_train)).numpy()
    clf = LogisticRegression(max_iter=2000, class_weight="balanced" if balanced else None, random_state=seed)
    clf.fit(z, y_train)
    coef = np.zeros((head.n_classes, z.shape[1]), np.float32)
    intercept = np.full(head.n_classes, -1e4, np.float32)  # a class absent from training: never
    if len(clf.classes_) == 2:  # sklearn keeps one row for two classes: logits (0, w.x + b)
        coef[clf.classes_] = np.stack([np.zeros_like(clf.coef_[0]), clf.coef_[0]])
        intercept[clf.classes_] = [0.0, clf.intercept_[0]]
    else:
        coef[clf.classes_], intercept[clf.classes_] = clf.coef_, clf.intercept_
    head.set_weights(coef, intercept)
    return head

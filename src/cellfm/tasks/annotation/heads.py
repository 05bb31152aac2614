"""Building annotation heads by name or from a saved spec, and fitting the linear CLS head.

Every head is an `cellfm.model.annotation_head.AnnotationHead`; nothing outside this module names
a head class."""

from __future__ import annotations

import numpy as np

from cellfm.config import ModelConfig
from cellfm.model.annotation_head import AnnotationHead
from cellfm.model.cell_type_head import CellTypeHead
from cellfm.model.cls_heads import ClsLinearHead, ClsMlpHead

HEAD_DROPOUT = 0.1  # official cfg.enc_dropout, used by the query layers
_CLASSES = {"official": CellTypeHead, "cls_linear": ClsLinearHead, "cls_mlp": ClsMlpHead}


def new_head(kind: str, config: ModelConfig, n_classes: int) -> AnnotationHead:
    """A fresh head of `kind` for an encoder of `config`."""
    if kind == "official":
        return CellTypeHead(config.d_model, config.n_heads, n_classes, HEAD_DROPOUT, config.layer_norm_eps)
    return _CLASSES[kind](config.d_model, n_classes)


def head_from_spec(spec: dict) -> AnnotationHead:
    """The head of `spec` (from `AnnotationHead.spec()`), weights not set."""
    args = {k: v for k, v in spec.items() if k != "kind"}
    return _CLASSES[spec["kind"]](**args)


def fit_linear_head(
    head: ClsLinearHead, cls_train: np.ndarray, y_train: np.ndarray, balanced: bool, seed: int
) -> ClsLinearHead:
    """Multinomial logistic regression (L-BFGS, L2, C=1) on the standardised CLS vectors of the
    training cells, copied into `head`: deterministic and free of learning-rate or epoch choices."""
    import torch
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

"""How well an embedding in `obsm` separates a user's labelled cell types, next to the same model
at random init (what pretraining added), PCA of HVG log counts and chance. `cellfm demo` prints
this; the checks on the embedding itself belong to `embed`, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import silhouette_score
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from cellfm.cellfm import CellFM
from cellfm.contract.labels import is_unlabelled
from cellfm.embedding.memory import embed
from cellfm.evaluation.baselines import HvgPca
from cellfm.model import CellFMModule
from cellfm.wording import UsageError, arg

RANDOM_INIT, PCA = "same model, random init", "PCA of HVG log counts"


@dataclass
class Separation:
    """Scores of each embedding on the labelled cells, and what chance would give."""

    table: pd.DataFrame  # embedding, knn_acc (k-fold k-NN accuracy), silhouette (cosine)
    chance: float  # accuracy of always guessing the largest type
    largest_type: str
    n_labelled: int
    n_types: int


def separation_scores(
    adata: ad.AnnData,
    model: CellFM,
    label_key: str,
    *,
    use_rep: str = "X_cellfm",
    k: int = 15,
    folds: int = 5,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> Separation:
    """Score `obsm[use_rep]` (from `embed` with `model`), an untrained `model` of the same shape
    and PCA of HVG log counts of `adata.X` (raw counts) on the cells `label_key` labels. `adata`
    is only read. `device` None: CUDA when available."""
    if use_rep not in adata.obsm:
        raise UsageError(f"obsm has no {use_rep!r}: run cellfm.embed first, or pass {arg('use_rep')}")
    if label_key not in adata.obs.columns:
        raise KeyError(f"obs has no column {label_key!r} (columns: {list(adata.obs.columns)})")
    known = ~is_unlabelled(adata.obs[label_key])
    labels = adata.obs[label_key].astype(str).to_numpy()[known]
    kinds, counts = np.unique(labels, return_counts=True)
    if len(kinds) < 2 or counts.min() < folds:
        raise ValueError(f"{label_key!r} needs at least 2 types of at least {folds} labelled cells each")
    torch.manual_seed(seed)
    untrained = CellFM(model.config, CellFMModule(model.config), vocab=model.vocab)
    random_init = embed(adata, untrained, device=device, copy=True, progress=False, empty="zero",
                        key_added="X_random_init").obsm["X_random_init"]
    embeddings = {f"CellFM ({use_rep})": adata.obsm[use_rep], RANDOM_INIT: random_init,
                  PCA: HvgPca(seed=seed).fit_transform(adata.X)}
    rows = []
    for name, emb in embeddings.items():
        emb = np.asarray(emb)[known]
        knn = cross_val_score(KNeighborsClassifier(min(k, len(labels) - 1)), emb, labels, cv=folds).mean()
        rows.append({"embedding": name, "knn_acc": float(knn),
                     "silhouette": float(silhouette_score(emb, labels, metric="cosine"))})
    return Separation(pd.DataFrame(rows), counts.max() / counts.sum(), str(kinds[counts.argmax()]),
                      int(known.sum()), len(kinds))

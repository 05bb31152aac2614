"""Cell-identity probe: does the CLS embedding know what kind of cell it summarises?

Masked-value loss can fall while the CLS vector learns little more than a cell's library size, so
pretraining also scores the CLS on labelled cells: kNN accuracy and linear-probe accuracy, each by
stratified k-fold cross-validation over the probe cells. The cells are tokenized once (no masking,
fixed subsampling seed), so every evaluation sees exactly the same inputs and step 0 (the random
init) is the reference a trained model must beat.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cellfm.batch import CellBatch
from cellfm.config import ModelConfig
from cellfm.contract.labels import is_unlabelled
from cellfm.contract.setup import ModelSpec, setup_cells
from cellfm.io.read import read_cells
from cellfm.vocab import load_vocabulary


@dataclass
class ProbeSet:
    """Labelled cells of one file, tokenized once for a model's vocabulary."""

    name: str
    batches: list[CellBatch]  # cell_index = row in `labels`
    labels: np.ndarray  # (n_cells,) int class codes
    classes: list[str]
    rows: np.ndarray  # (n_cells,) row of each probe cell in the file, for baselines on the same cells


def load_probe_set(path: str | Path, label_key: str, config: ModelConfig, *, max_cells: int = 2000,
                   min_class_size: int = 10, batch_size: int = 64, seed: int = 0) -> ProbeSet:
    """Read raw counts + labels from an .h5ad; keep classes with >= `min_class_size` cells. The
    counts pass the same input contract as every workflow (`cellfm.contract.setup_cells`); cells
    with no matched gene are dropped.

    At most `max_cells` cells are kept (a fixed random subset), so a probe costs seconds.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"probe file {path} not found (TrainConfig.probe_files)")
    adata = read_cells(path)
    if label_key not in adata.obs.columns:
        raise KeyError(f"probe file {path.name} has no obs column {label_key!r} "
                       f"(TrainConfig.probe_label_key); columns: {list(adata.obs.columns)}")
    labels = adata.obs[label_key].astype(str).to_numpy()
    rows = np.flatnonzero(~is_unlabelled(adata.obs[label_key]))
    if len(rows) > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
    names, counts = np.unique(labels[rows], return_counts=True)  # classes too small to cross-validate go
    rows = rows[np.isin(labels[rows], names[counts >= min_class_size])]
    adata = adata[rows].copy()
    labels = labels[rows]
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"probe file {path.name}: fewer than 2 classes of >= {min_class_size} cells in "
                         f"obs[{label_key!r}]")
    gene_key = "gene_symbol" if "gene_symbol" in adata.var.columns else None
    try:
        cells = setup_cells(adata, ModelSpec(config, load_vocabulary(config.vocabulary)), gene_key=gene_key,
                            empty="zero", seed=seed)
    except (ValueError, KeyError) as err:
        raise ValueError(f"probe file {path.name} (TrainConfig.probe_files): {err}") from None
    batches = list(cells.batches(batch_size))
    present = np.zeros(len(labels), dtype=bool)
    for b in batches:
        present[b.cell_index.numpy()] = True
    codes = np.searchsorted(classes, labels)
    if not present.all():  # cells with no matched gene: drop them from the labels, keep indices aligned
        codes = np.where(present, codes, -1)
    return ProbeSet(path.stem, batches, codes, classes, rows)


@torch.no_grad()
def cls_embeddings(module: nn.Module, probe: ProbeSet, device: torch.device | str = "cpu") -> np.ndarray:
    """(n_cells, D) CLS outputs in eval mode (rows of cells without tokens stay NaN)."""
    was_training = module.training
    module.eval()
    out = np.full((len(probe.labels), module.config.d_model), np.nan, dtype=np.float32)
    for batch in probe.batches:
        batch = batch.to(device)
        states, _ = module.encode(batch.gene_ids, batch.values, batch.token_mask)
        out[batch.cell_index.cpu().numpy()] = states[:, 0].float().cpu().numpy()
    module.train(was_training)
    return out


def probe_accuracy(emb: np.ndarray, labels: np.ndarray, *, folds: int = 5, k: int = 15,
                   seed: int = 0) -> dict[str, float]:
    """kNN (k=`k`, Euclidean) and logistic-regression (standardised features) accuracy, k-fold CV."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ok = (labels >= 0) & np.isfinite(emb).all(1)
    X, y = emb[ok], labels[ok]
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    knn = KNeighborsClassifier(n_neighbors=k)  # raw distances, as sc.pp.neighbors(use_rep=...) sees them
    lin = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    return {"knn_acc": float(cross_val_score(knn, X, y, cv=cv).mean()),
            "linear_acc": float(cross_val_score(lin, X, y, cv=cv).mean())}


def probe_scores(module: nn.Module, probes: list[ProbeSet], device: torch.device | str = "cpu"
                 ) -> dict[str, float]:
    """{'probe/<set>/knn_acc', 'probe/<set>/linear_acc', ..., 'probe/mean_knn_acc', ...}."""
    scores: dict[str, float] = {}
    for p in probes:
        for key, val in probe_accuracy(cls_embeddings(module, p, device), p.labels).items():
            scores[f"probe/{p.name}/{key}"] = val
    for key in ("knn_acc", "linear_acc"):
        vals = [v for k, v in scores.items() if k.endswith("/" + key)]
        if vals:
            scores[f"probe/mean_{key}"] = float(np.mean(vals))
    return scores


__all__ = ["ProbeSet", "cls_embeddings", "load_probe_set", "probe_accuracy", "probe_scores"]

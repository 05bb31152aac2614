"""Held-out evaluation of the cell type annotator against logistic regression and kNN on PCA."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cellfm.tasks.annotation import UNKNOWN, CellTypeAnnotator, Mode
from cellfm.tasks.annotation_data import checked_labels

if TYPE_CHECKING:
    import anndata as ad

    from cellfm.cellfm import CellFM


def evaluate_annotation(
    adata: ad.AnnData,
    label_key: str,
    model: CellFM | str | Path,
    *,
    mode: Mode = "frozen",
    test_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
    **fit_kwargs,
) -> dict:
    """Stratified held-out split; CellFM annotator vs logistic regression on HVG+PCA and kNN on PCA.

    Returns a dict with a `table` (DataFrame: method, accuracy, macro_f1), the test labels and every
    method's predictions (for a confusion matrix), the annotator's rejection rate and its per-epoch
    history.
    """
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import train_test_split

    from cellfm.evaluation.baselines import pca_knn, pca_logistic_regression

    labels = checked_labels(adata, label_key, min_cells=fit_kwargs.get("min_cells_per_class", 5))
    keep = np.flatnonzero(labels.notna().to_numpy())
    y = labels.iloc[keep].astype(str).to_numpy()
    tr, te = train_test_split(keep, test_size=test_fraction, stratify=y, random_state=seed)
    tr, te = np.sort(tr), np.sort(te)
    train, test = adata[tr].copy(), adata[te].copy()
    y_tr, y_te = labels.iloc[tr].astype(str).to_numpy(), labels.iloc[te].astype(str).to_numpy()

    ann = CellTypeAnnotator().fit(
        train, label_key, model=model, mode=mode, seed=seed, progress=progress, **fit_kwargs
    )
    ann.predict(test, progress=progress)
    name = f"CellFM ({mode})"
    preds = {
        name: test.obs["cellfm_label_closed_set"].astype(str).to_numpy(),
        "logreg HVG+PCA": pca_logistic_regression(train.X, y_tr, test.X, seed=seed),
        "kNN PCA": pca_knn(train.X, y_tr, test.X, seed=seed),
    }
    rows = [
        {"method": m, "accuracy": accuracy_score(y_te, p), "macro_f1": f1_score(y_te, p, average="macro")}
        for m, p in preds.items()
    ]
    accepted = test.obs["cellfm_label"].astype(str).to_numpy() != UNKNOWN
    return {
        "table": pd.DataFrame(rows),
        "y_true": y_te,
        "predictions": preds,
        "rejected_fraction": test.uns["cellfm_annotation"]["rejected_fraction"],
        "accuracy_on_accepted": float((y_te[accepted] == preds[name][accepted]).mean())
        if accepted.any()
        else float("nan"),
        "temperature": ann.temperature,
        "history": ann.history,
        "stops": ann.stops,
        "n_train": len(tr),
        "n_test": len(te),
    }

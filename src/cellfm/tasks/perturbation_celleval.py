"""The field's perturbation scores: Arc Institute's cell-eval (the Virtual Cell Challenge metrics)
on every method of `cellfm perturb`.

cell-eval compares a real and a predicted AnnData that share genes (same order), a perturbation
column and a control label, both log-normalised. Our methods predict a mean profile per unseen
perturbation, so each predicted cell is a real control cell moved by the predicted change
(profile - control mean; clipped at 0, as log-normalised values are), as many as the real
perturbation has cells: the cell-to-cell spread stays the control's, the shift is the method's.
Both AnnData carry the same control cells. cell-eval is optional (`pip install "cellfm[perteval]"`).
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellfm.io.write import write_h5ad

PERT_COL = "perturbation"
# VCC's three (DES, PDS, MAE) and the rank-based ones; the rest of "full" is slow or redundant here
CELLEVAL_METRICS = {
    "overlap_at_N": "DES (overlap of DE genes at N)",
    "discrimination_score_l1": "PDS (perturbation discrimination, L1)",
    "mae": "MAE",
    "de_spearman_lfc_sig": "Spearman of DE log fold changes",
    "de_direction_match": "DE direction match",
    "pr_auc": "DE PR-AUC",
    "roc_auc": "DE ROC-AUC",
}
NOT_INSTALLED = "cell-eval not installed (pip install \"cellfm[perteval]\")"


def celleval_available() -> bool:
    try:
        import cell_eval  # noqa: F401
    except ImportError:
        return False
    return True


def celleval_layout(
    cells: ad.AnnData, conditions: list[str], control: str, predictions: dict[str, pd.DataFrame],
    condition_key: str = "condition", seed: int = 0,
) -> tuple[ad.AnnData, dict[str, ad.AnnData]]:
    """The real AnnData (the `conditions`' cells and the control cells, log-normalised X) and one
    predicted AnnData per method, in cell-eval's layout: obs[PERT_COL] (the target, "GENE" for
    "GENE+ctrl"), control label `control`.

    `predictions[method]`: predicted mean profile per condition (conditions x cells.var_names).
    """
    cond = cells.obs[condition_key].astype(str).to_numpy()
    keep = np.flatnonzero(np.isin(cond, [*conditions, control]))
    X = cells.X[keep]
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    X = X.astype(np.float32)
    labels = np.array([_target(c, control) for c in cond[keep]])
    var = pd.DataFrame(index=cells.var_names.astype(str))
    real = ad.AnnData(X, obs=pd.DataFrame({PERT_COL: labels}, index=cells.obs_names[keep].astype(str)),
                      var=var)
    ctrl = X[labels == control]
    ctrl_mean = ctrl.mean(0)
    rng = np.random.default_rng(seed)
    draws = {c: rng.choice(len(ctrl), int((labels == _target(c, control)).sum()), replace=True)
             for c in conditions}
    preds = {}
    for method, profiles in predictions.items():
        blocks, names = [ctrl], [np.full(len(ctrl), control)]
        for c in conditions:
            shift = profiles.loc[c, cells.var_names].to_numpy(np.float32) - ctrl_mean
            blocks.append(np.maximum(ctrl[draws[c]] + shift, 0.0))
            names.append(np.full(len(draws[c]), _target(c, control)))
        labels_pred = np.concatenate(names)
        obs = pd.DataFrame({PERT_COL: labels_pred}, index=[f"pred{i}" for i in range(len(labels_pred))])
        preds[method] = ad.AnnData(np.concatenate(blocks).astype(np.float32), obs=obs, var=var.copy())
    return real, preds


def _target(condition: str, control: str) -> str:
    """GEARS' "GENE+ctrl" -> "GENE": cell-eval names a perturbation by its target (and leaves the
    target gene out of its discrimination score)."""
    if condition == control:
        return condition
    return "+".join(g for g in condition.split("+") if g != control) or condition


def write_celleval_layout(real: ad.AnnData, preds: dict[str, ad.AnnData], folder: str | Path) -> Path:
    """`folder/real.h5ad` and `folder/pred_<method>.h5ad` (what `cell-eval run -ar -ap` reads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_h5ad(real, folder / "real.h5ad", overwrite=True)
    for method, pred in preds.items():
        write_h5ad(pred, folder / f"pred_{slug(method)}.h5ad", overwrite=True)
    return folder


def slug(method: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", method.lower()).strip("_")


def celleval_scores(real: ad.AnnData, preds: dict[str, ad.AnnData], control: str,
                    num_threads: int = 1) -> pd.DataFrame:
    """Per method x perturbation, cell-eval's `CELLEVAL_METRICS` (columns `ce_<metric>`).

    Raises ImportError without cell-eval. Its DE (pdex, Wilcoxon) runs once per AnnData.
    """
    from cell_eval import MetricsEvaluator
    from cell_eval.metrics import metrics_registry

    rows = []
    skip = [m for m in metrics_registry.list_metrics() if m not in CELLEVAL_METRICS]
    logging.getLogger("cell_eval").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="cellfm-celleval-") as tmp:
        for method, pred in preds.items():
            ev = MetricsEvaluator(adata_pred=pred.copy(), adata_real=real.copy(), control_pert=control,
                                  pert_col=PERT_COL, num_threads=num_threads,
                                  outdir=str(Path(tmp) / slug(method)))
            per, _ = ev.compute(profile="full", write_csv=False,
                                skip_metrics=skip)
            df = per.to_pandas()
            cols = [m for m in CELLEVAL_METRICS if m in df.columns]
            out = df[["perturbation", *cols]].rename(columns={m: f"ce_{m}" for m in cols})
            out.insert(0, "method", method)
            rows.append(out)
    return pd.concat(rows, ignore_index=True)

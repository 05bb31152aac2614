"""How a predicted treated population is scored against the observed one (`cellfm response`).

Three numbers per prediction, each computed in the method's own space and, after decoding, in
the common space (log-normalised HVG expression):
- MMD: squared RBF MMD (several bandwidths, set by the observed cells) of predicted vs observed;
- L2 of the means: distance between the mean predicted and the mean observed cell;
- Pearson of the mean shift: predicted vs observed (mean - mean of the source control cells).

Also the ridge decoder that takes an embedding-space prediction to expression, and the Markdown
summary. No model or AnnData here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import RidgeCV
from sklearn.preprocessing import StandardScaler

from cellfm.tasks.cellot import mmd_rbf
from cellfm.tasks.perturbation import pearson

METRICS = ("mmd", "l2_mean", "pearson_shift")


def population_scores(pred: np.ndarray, observed: np.ndarray, source: np.ndarray, seed: int = 0) -> dict:
    """MMD, L2 of the means and Pearson of the mean shift of `pred` (n, d) against `observed`
    (m, d); the shift is taken from the mean of `source`, the control cells that were moved."""
    base = source.mean(0)
    return {
        "mmd": mmd_rbf(pred, observed, seed=seed),
        "l2_mean": float(np.linalg.norm(pred.mean(0) - observed.mean(0))),
        "pearson_shift": pearson(pred.mean(0) - base, observed.mean(0) - base),
    }


class RidgeDecoder:
    """Embedding -> expression by ridge regression (alpha by efficient leave-one-out CV) on
    standardised features, fitted on a split's training cells; the common space's way in for
    every method that works in an embedding (CellFM and PCA alike, so both pay the same toll)."""

    def __init__(self, Z: np.ndarray, E: np.ndarray) -> None:
        self.scaler = StandardScaler().fit(Z)
        self.ridge = RidgeCV(alphas=np.logspace(-2, 4, 7)).fit(self.scaler.transform(Z), E)

    def __call__(self, Z: np.ndarray) -> np.ndarray:
        return self.ridge.predict(self.scaler.transform(Z)).astype(np.float32)


def response_markdown(scores: pd.DataFrame) -> str:
    """One table per setting: each method x space averaged over treated conditions and held-out
    groups (the TSV has every row)."""
    cols = [*METRICS, *(f"{m}_expr" for m in METRICS)]
    out = []
    for setting, part in scores.groupby("setting", sort=False):
        mean = part.groupby(["method", "space"], sort=False)[cols].mean().reset_index()
        mean = mean.sort_values("mmd_expr")
        held = ", ".join(sorted(part["held_out"].astype(str).unique()))
        out.append(f"### {setting} (held out: {held}; mean over {part['treated'].nunique()} treated "
                   f"condition(s) and held-out sets)\n")
        out.append("| method | space | MMD ↓ | L2 of means ↓ | Pearson Δ ↑ | MMD, expr ↓ | "
                   "L2 of means, expr ↓ | Pearson Δ, expr ↑ |")
        out.append("|---|---|---|---|---|---|---|---|")
        for _, r in mean.iterrows():
            cells = [f"{r[c]:.4f}" if np.isfinite(r[c]) else "n/a" for c in cols]
            out.append(f"| {r['method']} | {r['space']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)

"""cell-eval hookup: the export layout (always) and, with cell-eval installed, its metrics on a
simulated screen whose true effects are known."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cellfm.tasks.perturbation_celleval import (
    PERT_COL,
    celleval_layout,
    celleval_scores,
    write_celleval_layout,
)


def _screen(seed: int = 0) -> tuple[ad.AnnData, pd.DataFrame, np.ndarray]:
    """Log-normalised-like cells: control + 4 knock-outs, each shifting its own 8 genes by ±1.5."""
    rng = np.random.default_rng(seed)
    n_genes, conds = 60, ["A+ctrl", "B+ctrl", "C+ctrl", "D+ctrl"]
    base = rng.uniform(2.0, 3.5, n_genes)  # stays > 0 after a -1.5 effect
    effects = {}
    for i, c in enumerate(conds):
        e = np.zeros(n_genes)
        e[i * 8:(i + 1) * 8] = 1.5 * np.where(np.arange(8) % 2, 1, -1)
        effects[c] = e
    X, labels = [], []
    for c, n in [("ctrl", 150), *[(c, 80) for c in conds]]:
        mu = base + effects.get(c, 0.0)
        X.append(np.maximum(mu + rng.normal(0, 0.4, (n, n_genes)), 0))
        labels += [c] * n
    genes = [f"g{i}" for i in range(n_genes)]
    cells = ad.AnnData(np.concatenate(X).astype(np.float32), obs=pd.DataFrame({"condition": labels}),
                       var=pd.DataFrame(index=genes))
    cells.obs_names = [f"c{i}" for i in range(cells.n_obs)]
    truth = pd.DataFrame(np.stack([base + effects[c] for c in conds]), index=conds, columns=genes)
    return cells, truth, base


def test_export_layout_matches_cell_evals_contract(tmp_path):
    cells, truth, base = _screen()
    test = ["A+ctrl", "C+ctrl"]
    preds = {"truth": truth.loc[test], "no change (control mean)": pd.DataFrame(
        np.tile(base, (2, 1)), index=test, columns=truth.columns)}
    real, pred = celleval_layout(cells, test, "ctrl", preds)
    assert set(real.obs[PERT_COL]) == {"ctrl", "A", "C"}  # GEARS' "A+ctrl" named by its target
    assert real.n_obs == 150 + 2 * 80
    ctrl_real = real.X[real.obs[PERT_COL] == "ctrl"]
    for p in pred.values():
        assert list(p.var_names) == list(real.var_names)
        counts = p.obs[PERT_COL].value_counts()
        assert counts.sort_index().equals(real.obs[PERT_COL].value_counts().sort_index())
        assert np.array_equal(p.X[p.obs[PERT_COL] == "ctrl"], ctrl_real)  # the same control cells
        assert p.X.min() >= 0
    # the predicted cells carry the method's shift: their mean is near the predicted profile
    a = pred["truth"].X[pred["truth"].obs[PERT_COL] == "A"].mean(0)
    assert np.abs(a - truth.loc["A+ctrl"].to_numpy()).max() < 0.25
    folder = write_celleval_layout(real, pred, tmp_path / "ce")
    assert sorted(f.name for f in folder.iterdir()) == [
        "pred_no_change_control_mean.h5ad", "pred_truth.h5ad", "real.h5ad"]
    back = ad.read_h5ad(folder / "pred_truth.h5ad")
    assert PERT_COL in back.obs and back.shape == pred["truth"].shape


def test_cell_eval_metrics_rank_the_true_effect_above_no_change():
    pytest.importorskip("cell_eval")
    cells, truth, base = _screen()
    test = list(truth.index)
    preds = {"truth": truth, "no change": pd.DataFrame(np.tile(base, (4, 1)), index=test,
                                                       columns=truth.columns)}
    real, pred = celleval_layout(cells, test, "ctrl", preds)
    scores = celleval_scores(real, pred, "ctrl").groupby("method").mean(numeric_only=True)
    assert {"ce_overlap_at_N", "ce_discrimination_score_l1", "ce_mae"} <= set(scores.columns)
    good, none = scores.loc["truth"], scores.loc["no change"]
    assert good.ce_overlap_at_N > 0.8 > none.ce_overlap_at_N
    assert good.ce_mae < none.ce_mae
    # PDS (1 best): each true effect is closest to its own perturbation; "no change" is not
    assert good.ce_discrimination_score_l1 > none.ce_discrimination_score_l1

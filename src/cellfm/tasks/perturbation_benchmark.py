"""GEARS vs GEARS + CellFM vs simple baselines on the same unseen knock-outs, several splits.

    AnnData (counts, obs condition 'ctrl' / 'GENE+ctrl')
    -> checked and log-normalised once (perturbation.read_screen)
    -> GEARS input (perturbation_gears.gears_input) -> PertData offline (our GO graph)
    -> CellFM gene tokens of the control cells (once)
    -> per split seed: GEARS, GEARS + CellFM tokens, no change, mean, linear models
    -> per-perturbation scores (perturbation_gears.score_profiles) and their mean per method
    -> reverse perturbation: every candidate ranked against each unseen observed profile
       (perturbation_reverse), top-1/3/10 accuracy per method beside chance.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cellfm.tasks.gears_cell_tokens import attach_control_index, control_gene_tokens
from cellfm.tasks.go_graph import load_gene2go
from cellfm.tasks.perturbation import Screen, perturbation_gene_features, read_screen, similarity_predict
from cellfm.tasks.perturbation_baselines import go_gene_embedding, linear_model_predict
from cellfm.tasks.perturbation_celleval import (
    CELLEVAL_METRICS,
    NOT_INSTALLED,
    celleval_available,
    celleval_layout,
    celleval_scores,
    write_celleval_layout,
)
from cellfm.tasks.perturbation_gears import (
    GearsConfig,
    _quiet,
    de_genes,
    gears_input,
    predicted_profiles,
    prepare_pert_data,
    require_gears,
    score_profiles,
    train_gears,
)
from cellfm.tasks.perturbation_reverse import (
    additive_pairs,
    candidate_conditions,
    gears_candidate_profiles,
    rank_hits,
    retrieval_profiles,
    summarise_reverse,
    targets_of,
)

if TYPE_CHECKING:
    import anndata as ad

    from cellfm.cellfm import CellFM

METRICS = ["pearson_delta", "pearson_delta_de", "mse_de"]


@dataclass(frozen=True)
class GearsBenchmarkResult:
    """`evaluate_perturbation_gears`: mean ± sd over seeds per method (`table`), one row per
    method x seed x perturbation, the settings and split seeds; reverse perturbation's top-k
    accuracy per method (`reverse`, None when not run) and its per-perturbation rows."""

    table: pd.DataFrame
    per_perturbation: pd.DataFrame
    config: GearsConfig
    seeds: tuple[int, ...]
    reverse: pd.DataFrame | None = None
    reverse_per_perturbation: pd.DataFrame | None = None
    celleval_note: str | None = None  # why the cell-eval columns are missing (None: present)

    def __getitem__(self, key: str):  # callers written for the former dict keep working
        return getattr(self, key)


def evaluate_perturbation_gears(
    adata: ad.AnnData,
    model: CellFM,
    go_dir: str | Path,
    *,
    seeds: tuple[int, ...] = (1, 2, 3),
    config: GearsConfig | None = None,
    workdir: str | Path | None = None,
    condition_key: str = "condition",
    control: str = "ctrl",
    size_factor_key: str | None = None,
    reverse: bool = True,
    celleval_dir: str | Path | None = None,
    log=print,
) -> GearsBenchmarkResult:
    """Scores of every method on GEARS' simulation split for each seed in `seeds`.

    `size_factor_key`: obs column of each cell's full-transcriptome count (a targeted panel's own
    total is a poor size factor); None: the panel's total. `reverse`: also rank every candidate
    perturbation against each unseen observed profile (perturbation_reverse). With cell-eval
    installed its metrics join the table (`ce_*` columns); `celleval_dir`: where each split's real
    and predicted cells are written in cell-eval's layout (`seed<k>/`).
    """
    require_gears()
    cfg = config or GearsConfig()
    use_ce = celleval_available()
    tmp = tempfile.TemporaryDirectory(prefix="cellfm-gears-") if workdir is None else None
    work = Path(tmp.name if tmp else workdir)
    try:
        screen = read_screen(adata, condition_key, control, size_factor_key, model)  # every check, once
        np.random.seed(0)  # GEARS pairs cells with random control cells through numpy's global RNG
        gene2go = load_gene2go(go_dir)
        screen = _known_targets(screen, gene2go, log)
        data = gears_input(screen, cfg.max_cells_per_condition)
        log(f"GEARS input: {data.n_obs} cells x {data.n_vars} genes, "
            f"{data.obs.condition.nunique() - 1} perturbations")
        pert_data = prepare_pert_data(data, work, gene2go)
        ctrl = pert_data.ctrl_adata
        ctrl_X = ctrl.X.toarray()
        ctrl_mean = ctrl_X.mean(0)
        tokens = control_gene_tokens(model, ctrl_X, list(pert_data.adata.var_names))
        attach_control_index(pert_data, ctrl)
        profiles = _condition_profiles(pert_data.adata)
        gene_embeddings = _perturbation_embeddings(list(profiles.index), model, pert_data.gene2go)
        rows, rev_rows = [], []
        cands = candidate_conditions(list(profiles.index))
        singles = [c for c in cands if len(targets_of(c)) == 1]
        ctrl_graphs = pert_data.dataset_processed["ctrl"][:64]
        for seed in seeds:
            with _quiet(True):
                pert_data.prepare_split("simulation", seed=seed, train_gene_set_size=cfg.train_gene_set_size)
                pert_data.get_dataloader(cfg.batch_size, test_batch_size=128)
            sets = pert_data.set2conditions
            test = [c for c in sets["test"] if c != "ctrl"]
            fit = [c for c in sets["train"] + sets["val"] if c != "ctrl"]
            de = de_genes(pert_data.adata, test)
            truth = profiles.loc[test]
            preds = _baselines(profiles.loc[fit], test, ctrl_mean, gene_embeddings)
            cand_preds = {}
            if reverse:
                cand_preds = {name: additive_pairs(p, ctrl_mean, cands) for name, p in
                              _baselines(profiles.loc[fit], singles, ctrl_mean, gene_embeddings).items()}
                cand_preds["retrieval (training profiles; pairs additive)"] = retrieval_profiles(
                    profiles.loc[fit], ctrl_mean, cands)
            for name, tok in [("GEARS", None), ("GEARS + CellFM gene tokens", tokens)]:
                t0 = time.time()
                g = train_gears(pert_data, cfg, tokens=tok, seed=seed)
                pred, gears_truth = predicted_profiles(g)
                preds[name] = pred.loc[test]
                if reverse:
                    cand_preds[name] = gears_candidate_profiles(
                        g.best_model, ctrl_graphs, pert_data.node_map_pert, cands, list(profiles.columns))
                log(f"seed {seed}: {name} trained in {time.time() - t0:.0f} s")
                if not np.allclose(gears_truth.loc[test].to_numpy(), truth.to_numpy(), atol=1e-4):
                    raise RuntimeError("GEARS' test cells differ from the test conditions' cells")
            ce = None
            if use_ce or celleval_dir is not None:
                real, ce_preds = celleval_layout(pert_data.adata, test, "ctrl", preds, seed=seed)
                if celleval_dir is not None:
                    write_celleval_layout(real, ce_preds, Path(celleval_dir) / f"seed{seed}")
                if use_ce:
                    ce = celleval_scores(real, ce_preds, "ctrl").set_index(["method", "perturbation"])
            for name, pred in preds.items():
                per = score_profiles(pred, truth, ctrl_mean, de)
                if ce is not None:
                    per = per.join(ce.loc[name], on="perturbation")
                per.insert(0, "seed", seed)
                per.insert(0, "method", name)
                rows.append(per)
            for name, pred in cand_preds.items():
                hits = rank_hits(truth, pred)
                hits.insert(0, "seed", seed)
                hits.insert(0, "method", name)
                rev_rows.append(hits)
            log(f"seed {seed}: {len(test)} unseen perturbations: {', '.join(c.split('+')[0] for c in test)}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    per = pd.concat(rows, ignore_index=True)
    rev = pd.concat(rev_rows, ignore_index=True) if rev_rows else None
    return GearsBenchmarkResult(summarise(per), per, cfg, tuple(seeds),
                                summarise_reverse(rev) if rev is not None else None, rev,
                                None if use_ce else NOT_INSTALLED)


def _known_targets(screen: Screen, gene2go: dict, log) -> Screen:
    """Drop conditions whose target has no GO annotation: GEARS would treat their cells as
    unperturbed (cell-gears gives an unknown target no perturbation index), silently."""
    cond = screen.conditions
    targets = {c: [g for g in c.split("+") if g != "ctrl"] for c in pd.unique(cond) if c != screen.control}
    unknown = sorted(c for c, genes in targets.items() if not all(g in gene2go for g in genes))
    if not unknown:
        return screen
    log(f"left out {len(unknown)} condition(s) whose target has no GO annotation (GEARS needs one): "
        + ", ".join(unknown))
    return screen.take(~np.isin(cond, unknown))


def summarise(per: pd.DataFrame) -> pd.DataFrame:
    """Mean over perturbations within a seed, then mean and sd over seeds, per method."""
    cols = METRICS + [f"ce_{m}" for m in CELLEVAL_METRICS if f"ce_{m}" in per.columns]
    by_seed = per.groupby(["method", "seed"], sort=False)[cols].mean()
    mean = by_seed.groupby(level=0, sort=False).mean()
    sd = by_seed.groupby(level=0, sort=False).std(ddof=0).add_suffix("_sd")
    out = pd.concat([mean, sd], axis=1)
    return out.sort_values("pearson_delta", ascending=False).reset_index()


def _condition_profiles(data: ad.AnnData) -> pd.DataFrame:
    """Mean log-normalised profile of every non-control condition, (n_conditions, n_genes)."""
    cond = data.obs.condition.astype(str).to_numpy()
    names = [c for c in pd.unique(cond) if c != "ctrl"]
    X = data.X
    rows = [np.asarray(X[np.flatnonzero(cond == c)].mean(0)).ravel() for c in names]
    return pd.DataFrame(np.stack(rows), index=names, columns=data.var_names.astype(str))


def _perturbation_embeddings(conditions: list[str], model: CellFM, gene2go) -> dict[str, pd.DataFrame]:
    genes = [c.split("+")[0] for c in conditions]
    feats = perturbation_gene_features(genes, model)
    out = {name: pd.DataFrame(feats[key].to_numpy(), index=conditions)
           for name, key in [("CellFM gene table", "cellfm"), ("random", "random")]}
    out["GO annotations"] = pd.DataFrame(go_gene_embedding(genes, gene2go), index=conditions)
    return out


def _baselines(train: pd.DataFrame, test: list[str], ctrl_mean: np.ndarray,
               embeddings: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Predicted profiles (test conditions x genes) of every baseline."""
    Y = train.to_numpy()
    preds = {
        "no change (control mean)": np.tile(ctrl_mean, (len(test), 1)),
        "mean of training perturbations": np.tile(Y.mean(0), (len(test), 1)),
    }
    for name, E in embeddings.items():
        P_tr, P_te = _standardise(E.loc[train.index].to_numpy(), E.loc[test].to_numpy())
        preds[f"linear, P = {name}"] = linear_model_predict(Y, P_tr, P_te)
    E = embeddings["CellFM gene table"]
    delta = similarity_predict(E.loc[train.index].to_numpy(), Y - ctrl_mean, E.loc[test].to_numpy())
    preds["CellFM gene-table similarity (k-NN of effects)"] = delta + ctrl_mean
    return {name: pd.DataFrame(p, index=test, columns=train.columns) for name, p in preds.items()}


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = train.mean(0), train.std(0) + 1e-8
    return (train - mu) / sd, (test - mu) / sd


def perturbation_markdown(table: pd.DataFrame, celleval_note: str | None = None) -> str:
    """The summary table as Markdown, mean ± sd over split seeds; cell-eval's columns when they
    were computed, else a line saying why not."""
    ce = [f"ce_{m}" for m in CELLEVAL_METRICS if f"ce_{m}" in table.columns]
    names = ["Pearson Δ, all genes ↑", "Pearson Δ, top-20 DE ↑", "MSE, top-20 DE ↓",
             *(f"cell-eval {CELLEVAL_METRICS[c[3:]]}" for c in ce)]
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for _, r in table.iterrows():
        cells = [f"{r[m]:.3f} ± {r[m + '_sd']:.3f}" if np.isfinite(r[m]) else "n/a (Δ = 0)"
                 for m in METRICS + ce]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    if not ce:
        lines.append(f"\n{celleval_note or NOT_INSTALLED}: no DES, PDS, MAE or rank-based scores.")
    return "\n".join(lines)

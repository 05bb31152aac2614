"""Genetic perturbation, the fast way: predict the mean expression change of an unseen knock-out
from the knocked-out gene's CellFM gene embedding alone (`cellfm perturb --method embedding`).
GEARS itself, GEARS + CellFM and the linear baselines on GEARS' splits are in
`perturbation_benchmark.py`; this module also holds the pieces they share (effects, Pearson).

The effect of knocking out gene g is predicted by ridge regression (embedding -> delta over the
measured genes) or by a similarity-weighted average of the training knock-outs' effects. Training
and test perturbations are disjoint (k-fold over perturbations).

Baselines: the mean effect of the training perturbations (hard to beat when knock-outs share a
pathway), ridge on expression statistics of the perturbed gene in real cells, and ridge on random
gene vectors of the embedding's width.

Effect = mean log-normalised expression of the knock-out cells minus that of control cells, with
the full-transcriptome UMI count as size factor when the data carry it (the panel has 299 genes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold
from sklearn.preprocessing import StandardScaler

from cellfm.contract.counts import check_counts
from cellfm.contract.genes import gene_names, refuse_duplicate_genes
from cellfm.contract.setup import VocabularyModel, setup_cells
from cellfm.embedding.memory import get_gene_embeddings
from cellfm.evaluation.baselines import gene_expression_stats, random_gene_embeddings
from cellfm.tasks.gene_function import vocab_symbols_of
from cellfm.tokenizer import lognorm
from cellfm.wording import UsageError, arg

if TYPE_CHECKING:
    import anndata as ad

    from cellfm.cellfm import CellFM


@dataclass(frozen=True)
class Screen:
    """A perturbation screen checked once: its conditions and log-normalised expression.

    `values` (n_cells, n_genes) = log1p(count / total * 1e4), total = obs[size_factor_key] when
    given (the full-transcriptome UMI count of a targeted panel), else the cell's panel total.
    """

    conditions: np.ndarray  # (n_cells,) str
    values: sp.csr_matrix  # (n_cells, n_genes) float32
    genes: pd.Index
    obs_names: pd.Index
    control: str

    def take(self, rows: np.ndarray) -> Screen:
        """The screen restricted to `rows` (a boolean mask or row indices)."""
        return Screen(self.conditions[rows], self.values[rows], self.genes, self.obs_names[rows],
                      self.control)


def read_screen(
    adata: ad.AnnData, condition_key: str = "condition", control: str = "ctrl",
    size_factor_key: str | None = None, model: VocabularyModel | None = None,
) -> Screen:
    """Check a screen and log-normalise it: with the `model` it will meet, the whole input contract
    (`setup_cells`: counts, gene names, empty input), else the count judge and the duplicate
    check; then its conditions. Every perturbation workflow starts here, so the checks run once
    and read as in every other command."""
    if model is not None:
        setup_cells(adata, model, empty="zero")
    else:
        refuse_duplicate_genes(gene_names(adata, None), None)
        check_counts(adata.X, where="adata.X", fix="pass a screen with raw UMI counts in X")
    cond = condition_labels(adata, condition_key, control)
    totals = None
    if size_factor_key is not None:
        if size_factor_key not in adata.obs.columns:
            raise KeyError(f"obs has no column {size_factor_key!r}; pass "
                           f"{arg('size_factor_key', placeholder='column')} with each cell's total count, "
                           "or none to use the panel's total")
        totals = adata.obs[size_factor_key].to_numpy(dtype=np.float64)
    return Screen(cond, lognorm(adata.X, totals=totals), adata.var_names.astype(str),
                  adata.obs_names.astype(str), control)


def perturbation_effects(
    adata: ad.AnnData,
    condition_key: str = "condition",
    control: str = "ctrl",
    size_factor_key: str | None = None,
    min_cells: int = 20,
    model: VocabularyModel | None = None,
) -> pd.DataFrame:
    """Mean log-normalised expression change per perturbation, (n_perturbations, n_genes).

    Conditions are named GEARS-style, "GENE+ctrl"; the index holds GENE. Perturbations with fewer
    than `min_cells` cells are left out.
    """
    return screen_effects(read_screen(adata, condition_key, control, size_factor_key, model), min_cells)


def screen_effects(screen: Screen, min_cells: int = 20) -> pd.DataFrame:
    """`perturbation_effects` of a screen already read."""
    cond, L, control = screen.conditions, screen.values, screen.control
    ctrl_mean = np.asarray(L[cond == control].mean(0)).ravel()
    rows, names = [], []
    for c in sorted(set(cond) - {control}):
        sel = cond == c
        if sel.sum() < min_cells:
            continue
        rows.append(np.asarray(L[sel].mean(0)).ravel() - ctrl_mean)
        names.append(c.split("+")[0] if c.split("+")[0] != control else c.split("+")[-1])
    if len(rows) < 3:
        raise ValueError(f"only {len(rows)} perturbations with >= {min_cells} cells; need at least 3")
    return pd.DataFrame(np.stack(rows), index=pd.Index(names, name="perturbation"), columns=screen.genes)


def condition_labels(
    adata: ad.AnnData, condition_key: str = "condition", control: str = "ctrl"
) -> np.ndarray:
    """obs[condition_key] as strings, refused when the column or the control cells are missing
    (the advice names `condition_key=` / `--condition-key` by the interface in use)."""
    if condition_key not in adata.obs.columns:
        raise KeyError(
            f"obs has no column {condition_key!r} (columns: {list(adata.obs.columns)}); pass "
            f"{arg('condition_key', placeholder='column')} with the perturbation condition "
            "('ctrl' or 'GENE+ctrl')"
        )
    cond = adata.obs[condition_key].astype(str).to_numpy()
    if not (cond == control).any():
        raise UsageError(f"no control cells: obs[{condition_key!r}] never equals {control!r}; pass "
                         f"{arg('control', placeholder='name')} with the control condition's name")
    return cond


def ridge_predict(train_X: np.ndarray, train_Y: np.ndarray, test_X: np.ndarray) -> np.ndarray:
    """Ridge (alpha by leave-one-out CV) on standardised features. (n_test, n_genes)"""
    sc = StandardScaler().fit(train_X)
    reg = RidgeCV(alphas=np.logspace(-2, 5, 15)).fit(sc.transform(train_X), train_Y)
    return reg.predict(sc.transform(test_X))


def similarity_predict(
    train_X: np.ndarray, train_Y: np.ndarray, test_X: np.ndarray, k: int = 5, temperature: float = 0.1
) -> np.ndarray:
    """Softmax(cosine / T)-weighted mean of the k most similar training perturbations' effects."""
    a = train_X / (np.linalg.norm(train_X, axis=1, keepdims=True) + 1e-8)
    b = test_X / (np.linalg.norm(test_X, axis=1, keepdims=True) + 1e-8)
    sim = b @ a.T  # (n_test, n_train)
    out = np.zeros((len(test_X), train_Y.shape[1]))
    for i, s in enumerate(sim):
        top = np.argsort(-s)[: min(k, len(s))]
        w = np.exp((s[top] - s[top].max()) / temperature)
        out[i] = (w / w.sum()) @ train_Y[top]
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r, NaN when either side is constant (a 'no change' prediction has no direction)."""
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def perturbation_gene_features(
    genes: list[str], model: CellFM, reference: ad.AnnData | None = None, seed: int = 0
) -> dict[str, pd.DataFrame]:
    """Feature tables (index = perturbed gene) for every method that needs one.

    Genes missing from the vocabulary get the mean embedding (so the prediction falls back to the
    average effect); their number is in `features["cellfm"].attrs["n_missing"]`.
    """
    table = get_gene_embeddings(model)
    mapped = map_to_vocab(genes, model)
    emb = np.stack(
        [table.iloc[i - 1].to_numpy() if i > 0 else np.full(table.shape[1], np.nan) for i in mapped]
    ).astype(np.float32)
    missing = np.isnan(emb).any(1)
    if missing.any():
        emb[missing] = np.nanmean(emb[~missing], 0) if (~missing).any() else 0.0
    feats = {"cellfm": pd.DataFrame(emb, index=genes)}
    feats["cellfm"].attrs["n_missing"] = int(missing.sum())
    feats["random"] = random_gene_embeddings(genes, table.shape[1], seed=seed)
    if reference is not None:
        feats["expression_stats"] = gene_expression_stats(reference, genes)
    return feats


def map_to_vocab(genes: list[str], model: CellFM) -> np.ndarray:
    """(n_genes,) vocabulary id of each gene (0: not in the vocabulary)."""
    symbols = vocab_symbols_of(genes, model)
    return np.array([model.vocab.id_of(g) if g else 0 for g in symbols], dtype=np.int64)


def evaluate_perturbation(
    adata: ad.AnnData,
    model: CellFM,
    *,
    reference: ad.AnnData | None = None,
    n_folds: int = 5,
    top_de: int = 20,
    seed: int = 0,
    condition_key: str = "condition",
    control: str = "ctrl",
    size_factor_key: str | None = None,
) -> EmbeddingPerturbationResult:
    """k-fold over perturbations; Pearson of predicted vs true effect over all genes and over the
    `top_de` genes with the largest |true effect| of each held-out perturbation, averaged.

    `reference`: real cells (raw counts, many genes) for the expression-statistics baseline.
    """
    effects = perturbation_effects(adata, condition_key, control, size_factor_key, model=model)
    genes = effects.index.tolist()
    feats = perturbation_gene_features(genes, model, reference, seed)
    Y = effects.to_numpy()
    methods = {
        "mean of training effects": None,
        "CellFM gene emb: ridge": ("cellfm", ridge_predict),
        "CellFM gene emb: similarity (GEARS-like)": ("cellfm", similarity_predict),
        "random gene emb: ridge": ("random", ridge_predict),
    }
    if "expression_stats" in feats:
        methods["expression stats: ridge"] = ("expression_stats", ridge_predict)
    preds = {m: np.zeros_like(Y) for m in methods}
    folds = KFold(n_splits=min(n_folds, len(genes)), shuffle=True, random_state=seed)
    for tr, te in folds.split(Y):
        for m, spec in methods.items():
            if spec is None:
                preds[m][te] = Y[tr].mean(0)
            else:
                X = feats[spec[0]].to_numpy()
                preds[m][te] = spec[1](X[tr], Y[tr], X[te])
    rows = []
    for m, P in preds.items():
        for i, g in enumerate(genes):
            top = np.argsort(-np.abs(Y[i]))[:top_de]
            rows.append(
                {
                    "method": m,
                    "perturbation": g,
                    "pearson_all": pearson(P[i], Y[i]),
                    "pearson_top_de": pearson(P[i, top], Y[i, top]),
                    "mse_top_de": float(((P[i, top] - Y[i, top]) ** 2).mean()),
                }
            )
    per = pd.DataFrame(rows)
    table = per.groupby("method", sort=False)[["pearson_all", "pearson_top_de", "mse_top_de"]].mean()
    return EmbeddingPerturbationResult(table.reset_index(), per, effects, feats["cellfm"].attrs["n_missing"])


@dataclass(frozen=True)
class EmbeddingPerturbationResult:
    """`evaluate_perturbation`: mean scores per method, one row per method x perturbation, the
    true effects, and how many perturbed genes the vocabulary lacks."""

    table: pd.DataFrame
    per_perturbation: pd.DataFrame
    effects: pd.DataFrame
    n_missing_in_vocab: int

    def __getitem__(self, key: str):  # callers written for the former dict keep working
        return getattr(self, key)

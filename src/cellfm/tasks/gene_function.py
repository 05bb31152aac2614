"""Gene function prediction from gene embeddings, scored as the CellFM paper scores it.

CellFM's BinaryclassGeneFunction / MulticlassGeneFunction tutorials train a small MLP on frozen
gene embeddings; here each task is a linear probe (balanced, L2-regularised logistic regression on
standardised features) under 5-fold cross-validation, with the paper's metrics:
- binary: three Geneformer tasks (`PAPER_BINARY_TASKS`: dosage-sensitive vs -insensitive TFs,
  bivalent vs non-methylated, bivalent vs Lys4-only promoters; our reading of the paper's T1-T3,
  whose `t123.h5ad` the tutorial loads but the repository does not ship; the other Geneformer
  tasks on request), genes given as Ensembl ids and mapped onto the vocabulary; accuracy and AUROC;
- multi-label: per ontology (BP/MF/CC) the 10 most frequent GO terms among vocabulary genes
  (direct annotations, root terms excluded), every gene carrying at least one of them, a 10-way
  multi-label target; AUPR of all (gene, term) pairs pooled and Fmax as the tutorial computes them,
  and AUROC averaged over terms.
Features compared: the CellFM gene table, expression statistics of each gene across real cells
(log mean, log variance, detection rate; the baseline an embedding has to beat) and random vectors
of the embedding's width (chance).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cellfm.embedding.memory import get_gene_embeddings
from cellfm.evaluation.baselines import gene_expression_stats, random_gene_embeddings
from cellfm.evaluation.gene_labels import load_geneformer_tasks, load_go_annotations, load_go_term_names
from cellfm.progress import progress_bar
from cellfm.vocab import map_genes

if TYPE_CHECKING:
    import anndata as ad

    from cellfm.cellfm import CellFM


def vocab_symbols_of(identifiers: list[str] | pd.Index, model: CellFM) -> np.ndarray:
    """Vocabulary symbol of each identifier (symbol, alias or Ensembl id), "" where unmatched."""
    import warnings

    # map_genes gives each token to one column only (as a data set needs); a gene list may name the
    # same gene twice (symbol and Ensembl id), so identifiers left over are mapped again on their own
    uniq, inverse = np.unique(np.asarray([str(g) for g in identifiers], dtype=object), return_inverse=True)
    found = np.zeros(len(uniq), dtype=np.int64)
    todo = np.arange(len(uniq))
    with warnings.catch_warnings():  # short gene lists are expected here, not a restricted panel
        warnings.simplefilter("ignore")
        while len(todo):
            got = np.asarray(map_genes(pd.Index(uniq[todo]), model.vocab, min_genes=0).token_ids)
            if not (got > 0).any():
                break
            found[todo] = got
            todo = todo[got == 0]
    ids = found[inverse]
    genes = model.vocab.genes
    return np.array([genes[i - 1] if i > 0 else "" for i in ids], dtype=object)


def gene_features(
    genes: list[str], model: CellFM, reference: ad.AnnData | None = None, seed: int = 0
) -> dict[str, pd.DataFrame]:
    """Feature tables indexed by vocabulary symbol: "CellFM", "expression stats" (when
    `reference` cells are given), "random"."""

    emb = get_gene_embeddings(model)
    emb = emb[~emb.index.duplicated()].reindex(genes)
    feats = {"CellFM": emb}
    if reference is not None:
        ref_syms = vocab_symbols_of(reference.var_names, model)
        ref = reference[:, ref_syms != ""].copy()
        ref.var_names = ref_syms[ref_syms != ""].astype(str)
        ref.var_names_make_unique()
        feats["expression stats"] = gene_expression_stats(ref, genes)
    feats["random"] = random_gene_embeddings(genes, emb.shape[1], seed=seed)
    return feats


PAPER_BINARY_TASKS = ("dosage_sensitive_vs_insensitive_tf", "bivalent_vs_no_methyl", "bivalent_vs_lys4_only")
GO_ROOTS = {"GO:0008150", "GO:0003674", "GO:0005575"}  # biological_process, molecular_function, ...


def _probe():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000))


def cv_binary(X: np.ndarray, y: np.ndarray, n_folds: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold (accuracy, AUROC) of the linear probe, stratified folds."""
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    acc, auc = [], []
    for tr, te in folds.split(X, y):
        clf = _probe().fit(X[tr], y[tr])
        acc.append(accuracy_score(y[te], clf.predict(X[te])))
        auc.append(roc_auc_score(y[te], clf.decision_function(X[te])))
    return np.asarray(acc), np.asarray(auc)


def cv_multilabel_scores(X: np.ndarray, Y: np.ndarray, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold probabilities (N, T) of one probe per label column of Y (N, T)."""
    from sklearn.model_selection import KFold

    S = np.zeros(Y.shape, dtype=np.float64)
    for tr, te in KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(X):
        for t in range(Y.shape[1]):
            if len(np.unique(Y[tr, t])) < 2:  # a term absent from this training fold
                S[te, t] = Y[tr, t].mean()
                continue
            S[te, t] = _probe().fit(X[tr], Y[tr, t]).predict_proba(X[te])[:, 1]
    return S


def multilabel_metrics(Y: np.ndarray, S: np.ndarray, step: float = 0.01) -> dict[str, float]:
    """The tutorial's metrics on all (gene, term) pairs pooled: AUPR (trapezoid under the PR
    curve) and Fmax (best macro-F1 over thresholds 0, step, ..., 1 - step); plus AUROC averaged
    over terms and the label density (the AUPR of a random scorer)."""
    from sklearn.metrics import auc, f1_score, precision_recall_curve, roc_auc_score

    y, s = Y.ravel(), S.ravel()
    precision, recall, _ = precision_recall_curve(y, s)
    fmax = max(f1_score(y, (s >= t).astype(int), average="macro") for t in np.arange(0.0, 1.0, step))
    aurocs = [roc_auc_score(Y[:, t], S[:, t]) for t in range(Y.shape[1]) if 0 < Y[:, t].sum() < len(Y)]
    return {
        "aupr": float(auc(recall, precision)),
        "fmax": float(fmax),
        "auroc": float(np.mean(aurocs)),
        "label_density": float(y.mean()),
    }


def geneformer_task_genes(tasks: pd.DataFrame, model: CellFM) -> pd.DataFrame:
    """Labelled genes with their vocabulary symbol (Ensembl id first, then the symbol column)."""
    t = tasks.copy()
    by_id = vocab_symbols_of(t["ensembl_id"], model)
    by_sym = vocab_symbols_of(t["symbol"].replace("", "__none__"), model)
    t["vocab_symbol"] = np.where(by_id != "", by_id, by_sym)
    return t[t["vocab_symbol"] != ""].drop_duplicates(["task", "vocab_symbol"])


def evaluate_binary_tasks(
    model: CellFM,
    *,
    data_dir: str | Path | None = None,
    reference: ad.AnnData | None = None,
    tasks: list[str] | None = None,
    n_folds: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Table: task, method, accuracy, accuracy_sd, auroc, auroc_sd, n_genes, n_positive, n_unmapped.

    `tasks`: Geneformer task names (default: all in the label file; the paper's three are
    `PAPER_BINARY_TASKS`).
    """
    raw = load_geneformer_tasks(data_dir)
    if tasks is not None:
        unknown = sorted(set(tasks) - set(raw["task"]))
        if unknown:
            raise KeyError(f"unknown gene tasks {unknown}; available: {sorted(raw['task'].unique())}")
        raw = raw[raw["task"].isin(tasks)]
    mapped = geneformer_task_genes(raw, model)
    feats = gene_features(sorted(set(mapped["vocab_symbol"])), model, reference, seed)
    rows = []
    groups = list(mapped.groupby("task"))
    bar = progress_bar(len(groups), "gene function (binary)", unit="task", enabled=progress)
    for task, sub in groups:
        bar.update(1)
        sub = sub.drop_duplicates("vocab_symbol", keep=False)  # genes in both classes are ambiguous
        classes = sorted(sub["label"].unique())
        if len(classes) != 2 or sub["label"].value_counts().min() < n_folds:
            continue
        y = (sub["label"] == classes[0]).to_numpy().astype(int)
        for method, table in feats.items():
            X = table.loc[sub["vocab_symbol"]].to_numpy(dtype=np.float32)
            acc, auc = cv_binary(X, y, n_folds, seed)
            rows.append(
                {
                    "task": task,
                    "method": method,
                    "accuracy": acc.mean(),
                    "accuracy_sd": acc.std(),
                    "auroc": auc.mean(),
                    "auroc_sd": auc.std(),
                    "n_genes": len(sub),
                    "n_positive": int(y.sum()),
                    "n_unmapped": int((raw["task"] == task).sum() - len(sub)),
                }
            )
    bar.close()
    return pd.DataFrame(rows)


@dataclass
class GoTermScores:
    """GO top-term prediction: one summary row per (ontology, method), one row per term too."""

    summary: pd.DataFrame  # ontology, method, aupr, fmax, auroc, label_density, n_genes, n_terms
    terms: pd.DataFrame  # ontology, go_id, term, method, auroc, average_precision, n_positive


def go_top_terms(go: pd.DataFrame, genes: set[str], n_terms: int = 10) -> list[str]:
    """The `n_terms` GO terms annotated to most of `genes` (root terms excluded; ties by id)."""
    sub = go[go["symbol"].isin(genes) & ~go["go_id"].isin(GO_ROOTS)]
    sizes = sub.groupby("go_id")["symbol"].nunique()
    sizes = sizes.sort_index().sort_values(ascending=False, kind="stable")
    return sizes.index[:n_terms].tolist()


def evaluate_go_terms(
    model: CellFM,
    *,
    data_dir: str | Path | None = None,
    reference: ad.AnnData | None = None,
    ontologies: tuple[str, ...] = ("BP", "MF", "CC"),
    n_terms: int = 10,
    max_genes: int | None = 3000,
    n_folds: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> GoTermScores:
    """GO top-`n_terms` multi-label prediction per ontology (`GoTermScores`). The genes are the
    vocabulary genes carrying at least one of the terms, subsampled to `max_genes` (seeded; None
    keeps all) to bound the run time.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score
    go_all = load_go_annotations(data_dir, propagated=False)
    names = load_go_term_names(data_dir)
    vocab = set(model.vocab.genes)
    rng = np.random.default_rng(seed)
    summary, per_term = [], []
    bar = progress_bar(len(ontologies), "gene function (GO)", unit="ontology", enabled=progress)
    for ont in ontologies:
        bar.update(1)
        go = go_all[(go_all["ontology"] == ont) & go_all["symbol"].isin(vocab)]
        terms = go_top_terms(go, vocab, n_terms)
        go = go[go["go_id"].isin(terms)]
        genes = np.array(sorted(set(go["symbol"])))
        if max_genes is not None and len(genes) > max_genes:
            genes = np.sort(rng.choice(genes, max_genes, replace=False))
        members = go.groupby("go_id")["symbol"].apply(set)
        Y = np.stack([np.isin(genes, list(members[t])) for t in terms], 1).astype(int)  # (N, T)
        for method, table in gene_features(genes.tolist(), model, reference, seed).items():
            S = cv_multilabel_scores(table.to_numpy(dtype=np.float32), Y, n_folds, seed)
            summary.append(
                {
                    "ontology": ont,
                    "method": method,
                    **multilabel_metrics(Y, S),
                    "n_genes": len(genes),
                    "n_terms": len(terms),
                }
            )
            for t, term in enumerate(terms):
                per_term.append(
                    {
                        "ontology": ont,
                        "go_id": term,
                        "term": names.get(term, ""),
                        "method": method,
                        "auroc": roc_auc_score(Y[:, t], S[:, t]),
                        "average_precision": average_precision_score(Y[:, t], S[:, t]),
                        "n_positive": int(Y[:, t].sum()),
                    }
                )
    bar.close()
    return GoTermScores(pd.DataFrame(summary), pd.DataFrame(per_term))

"""Gene function prediction from gene embeddings (CellFM's Binary/MulticlassGeneFunction tutorials).

Each task is a logistic regression on a per-gene feature vector, scored by 5-fold cross-validated
AUROC:
- binary: Geneformer's tasks (dosage-sensitive vs -insensitive TFs, bivalent vs non-methylated,
  long- vs short-range TFs, ...), genes given as Ensembl ids and mapped onto the vocabulary;
- multi-label: the k most frequent GO terms of moderate size per ontology (BP/MF/CC) among
  annotated vocabulary genes, one-vs-rest, AUROC averaged over terms.
Features compared: the CellFM gene table, expression statistics of each gene across real cells
(log mean, log variance, detection rate; the baseline an embedding has to beat) and random vectors
of the embedding's width (chance).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import anndata as ad

    from cellfm.cellfm import CellFM


def vocab_symbols_of(identifiers: list[str] | pd.Index, model: CellFM) -> np.ndarray:
    """Vocabulary symbol of each identifier (symbol, alias or Ensembl id), "" where unmatched."""
    import warnings

    from cellfm.vocab import map_genes

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
    from cellfm.embedding import get_gene_embeddings
    from cellfm.tasks.baselines import gene_expression_stats, random_gene_embeddings

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


def cv_auroc(X: np.ndarray, y: np.ndarray, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Per-fold AUROC of a balanced, L2-regularised logistic regression on standardised X."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    scores = []
    for tr, te in folds.split(X, y):
        clf = make_pipeline(
            StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000)
        )
        clf.fit(X[tr], y[tr])
        scores.append(roc_auc_score(y[te], clf.decision_function(X[te])))
    return np.asarray(scores)


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
    """Table: task, method, auroc, auroc_sd, n_genes, n_positive, n_unmapped."""
    from tqdm.auto import tqdm

    from cellfm.tasks.gene_labels import load_geneformer_tasks

    raw = load_geneformer_tasks(data_dir)
    if tasks is not None:
        unknown = sorted(set(tasks) - set(raw["task"]))
        if unknown:
            raise KeyError(f"unknown gene tasks {unknown}; available: {sorted(raw['task'].unique())}")
        raw = raw[raw["task"].isin(tasks)]
    mapped = geneformer_task_genes(raw, model)
    feats = gene_features(sorted(set(mapped["vocab_symbol"])), model, reference, seed)
    rows = []
    for task, sub in tqdm(mapped.groupby("task"), desc="gene function (binary)", disable=not progress):
        sub = sub.drop_duplicates("vocab_symbol", keep=False)  # genes in both classes are ambiguous
        classes = sorted(sub["label"].unique())
        if len(classes) != 2 or sub["label"].value_counts().min() < n_folds:
            continue
        y = (sub["label"] == classes[0]).to_numpy().astype(int)
        for method, table in feats.items():
            X = table.loc[sub["vocab_symbol"]].to_numpy(dtype=np.float32)
            s = cv_auroc(X, y, n_folds, seed)
            rows.append(
                {
                    "task": task,
                    "method": method,
                    "auroc": s.mean(),
                    "auroc_sd": s.std(),
                    "n_genes": len(sub),
                    "n_positive": int(y.sum()),
                    "n_unmapped": int((raw["task"] == task).sum() - len(sub)),
                }
            )
    return pd.DataFrame(rows)


def go_multilabel_terms(
    go: pd.DataFrame, universe: set[str], n_terms: int = 10, min_size: int = 50, max_size: int = 500
) -> list[str]:
    """The `n_terms` most frequent terms whose size within `universe` is in [min_size, max_size]."""
    sizes = go[go["symbol"].isin(universe)].groupby("go_id")["symbol"].nunique()
    sizes = sizes[(sizes >= min_size) & (sizes <= max_size)].sort_values(ascending=False, kind="stable")
    return sizes.index[:n_terms].tolist()


def evaluate_go_terms(
    model: CellFM,
    *,
    data_dir: str | Path | None = None,
    reference: ad.AnnData | None = None,
    ontologies: tuple[str, ...] = ("BP", "MF", "CC"),
    n_terms: int = 10,
    max_genes: int = 3000,
    n_folds: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """One-vs-rest AUROC per GO term. Table: ontology, go_id, term, method, auroc, n_positive, n_genes.

    The gene universe is the vocabulary genes with at least one annotation in the ontology,
    subsampled to `max_genes` (seeded) to keep the run short.
    """
    from tqdm.auto import tqdm

    from cellfm.tasks.gene_labels import load_go_annotations, load_go_term_names

    go_all = load_go_annotations(data_dir)
    names = load_go_term_names(data_dir)
    vocab = set(model.vocab.genes)
    rng = np.random.default_rng(seed)
    rows = []
    for ont in ontologies:
        go = go_all[(go_all["ontology"] == ont) & go_all["symbol"].isin(vocab)]
        universe = np.array(sorted(set(go["symbol"])))
        if len(universe) > max_genes:
            universe = np.sort(rng.choice(universe, max_genes, replace=False))
        scaled = max(10, int(len(universe) * 0.02))  # term sizes scale with the subsample
        terms = go_multilabel_terms(go, set(universe), n_terms, min_size=scaled, max_size=scaled * 5)
        feats = gene_features(universe.tolist(), model, reference, seed)
        members = go[go["go_id"].isin(terms)].groupby("go_id")["symbol"].apply(set)
        for term in tqdm(terms, desc=f"gene function (GO {ont})", disable=not progress):
            y = np.isin(universe, list(members[term])).astype(int)
            for method, table in feats.items():
                s = cv_auroc(table.to_numpy(dtype=np.float32), y, n_folds, seed)
                rows.append(
                    {
                        "ontology": ont,
                        "go_id": term,
                        "term": names.get(term, ""),
                        "method": method,
                        "auroc": s.mean(),
                        "n_positive": int(y.sum()),
                        "n_genes": len(universe),
                    }
                )
    return pd.DataFrame(rows)


def summarise_go(go_table: pd.DataFrame) -> pd.DataFrame:
    """Mean AUROC over terms per ontology and method."""
    return (
        go_table.groupby(["ontology", "method"], sort=False)["auroc"]
        .agg(["mean", "std", "count"])
        .rename(columns={"mean": "auroc", "std": "auroc_sd_over_terms", "count": "n_terms"})
        .reset_index()
    )

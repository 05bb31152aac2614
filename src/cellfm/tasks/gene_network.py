"""Gene networks from gene embeddings: nearest neighbours by cosine similarity, and whether those
neighbours share known biology.

`gene_neighbours` gives the top-k most similar genes of every gene (a long DataFrame). The check
`coannotation_enrichment` asks: of the neighbour pairs, what fraction share at least one term of an
annotation (GO biological process, Reactome pathway), compared with random pairs of the same genes?
It reports the fold enrichment, a binomial p-value against the random-pair rate, and a permutation
p-value (gene labels shuffled among the annotated genes, which keeps the neighbour graph's degree
structure). A co-expression network (Pearson correlation across real cells) is the baseline; random
embeddings give the chance level.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellfm.embedding.memory import get_gene_embeddings
from cellfm.evaluation.baselines import random_gene_embeddings
from cellfm.evaluation.gene_labels import annotation_sets, load_gmt, load_go_annotations
from cellfm.progress import progress_bar
from cellfm.tasks.gene_function import vocab_symbols_of
from cellfm.tokenizer import lognorm
from cellfm.wording import UsageError, arg

if TYPE_CHECKING:
    import anndata as ad


def cosine_neighbours(X: np.ndarray, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by cosine similarity, self excluded: (indices (N, k), similarities (N, k))."""
    Xn = X / (np.linalg.norm(X, axis=1, keepdims=True) + 1e-12)
    idx = np.zeros((len(X), k), dtype=np.int64)
    sim = np.zeros((len(X), k), dtype=np.float32)
    for a in range(0, len(X), chunk):
        S = Xn[a : a + chunk] @ Xn.T  # (chunk, N)
        S[np.arange(S.shape[0]), np.arange(a, a + S.shape[0])] = -np.inf
        top = np.argpartition(-S, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(S, top, 1), axis=1)
        idx[a : a + chunk] = np.take_along_axis(top, order, 1)
        sim[a : a + chunk] = np.take_along_axis(S, idx[a : a + chunk], 1)
    return idx, sim


def gene_neighbours(embeddings: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """Long table: gene, neighbour, rank (1 = most similar), cosine."""
    emb = embeddings[~embeddings.index.duplicated()]
    idx, sim = cosine_neighbours(emb.to_numpy(dtype=np.float32), k)
    genes = emb.index.to_numpy()
    return pd.DataFrame(
        {
            "gene": np.repeat(genes, k),
            "neighbour": genes[idx.ravel()],
            "rank": np.tile(np.arange(1, k + 1), len(genes)),
            "cosine": sim.ravel(),
        }
    )


def _membership(genes: np.ndarray, sets: dict[str, set[str]]) -> sp.csr_matrix:
    """Binary gene x term matrix. (G, T)"""
    pos = {g: i for i, g in enumerate(genes)}
    rows, cols = [], []
    for j, members in enumerate(sets.values()):
        for g in members:
            if g in pos:
                rows.append(pos[g])
                cols.append(j)
    return sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(genes), len(sets)))


def _share_rate(M: sp.csr_matrix, a: np.ndarray, b: np.ndarray) -> float:
    return float((M[a].multiply(M[b]).getnnz(axis=1) > 0).mean())


@dataclass(frozen=True)
class Enrichment:
    """How often neighbour pairs share an annotation, against random pairs of the same genes."""

    pairs: int  # neighbour pairs tested
    shared_fraction: float  # of the neighbour pairs, share at least one term
    random_fraction: float  # the same for random pairs
    fold_enrichment: float  # shared_fraction / random_fraction
    p_binomial: float  # one-sided binomial test of shared_fraction against random_fraction
    p_permutation: float  # from shuffling the annotations among genes


@dataclass
class GeneNetworkResult:
    """Co-annotation of top-k neighbours per method and annotation source, and CellFM's neighbours."""

    table: pd.DataFrame  # method, annotation, n_genes, then the `Enrichment` fields
    neighbours: pd.DataFrame  # CellFM's top-k neighbours: gene, neighbour, rank, cosine
    n_genes: int  # genes annotated, embedded (and detected in the reference)


def coannotation_enrichment(
    idx: np.ndarray,
    genes: np.ndarray,
    sets: dict[str, set[str]],
    n_random: int = 50000,
    n_permutations: int = 50,
    seed: int = 0,
) -> Enrichment:
    """Fraction of neighbour pairs sharing a term vs random pairs among the same genes.

    idx: (G, k) neighbour indices into `genes`; only genes with at least one term should be passed.
    """
    from scipy.stats import binomtest

    rng = np.random.default_rng(seed)
    M = _membership(genes, sets)
    a, b = np.repeat(np.arange(len(genes)), idx.shape[1]), idx.ravel()
    observed = _share_rate(M, a, b)
    ra, rb = rng.integers(0, len(genes), n_random), rng.integers(0, len(genes), n_random)
    keep = ra != rb
    expected = _share_rate(M, ra[keep], rb[keep])
    n_shared = int(round(observed * len(a)))
    p_binom = binomtest(n_shared, len(a), max(expected, 1e-12), alternative="greater").pvalue
    perm = []
    for _ in range(n_permutations):
        shuffled = M[rng.permutation(len(genes))]
        perm.append(_share_rate(shuffled, a, b))
    p_perm = (1 + sum(p >= observed for p in perm)) / (1 + n_permutations)
    fold = observed / max(expected, 1e-12)
    return Enrichment(len(a), observed, expected, fold, float(p_binom), float(p_perm))


def coexpression_features(reference: ad.AnnData, genes: list[str]) -> pd.DataFrame:
    """Each gene's z-scored log-normalised expression profile across the reference cells, so that
    cosine similarity between rows = Pearson correlation across cells. (G, n_cells)"""

    L = lognorm(reference.X).toarray()
    frame = pd.DataFrame(L.T, index=reference.var_names.astype(str))
    frame = frame[~frame.index.duplicated()].reindex(genes).fillna(0.0)
    X = frame.to_numpy(dtype=np.float32)
    X = (X - X.mean(1, keepdims=True)) / (X.std(1, keepdims=True) + 1e-8)
    return pd.DataFrame(X, index=frame.index)


def evaluate_gene_network(
    model,
    *,
    data_dir=None,
    reference: ad.AnnData | None = None,
    k: int = 10,
    min_detection: float = 0.05,
    seed: int = 0,
    progress: bool = True,
) -> GeneNetworkResult:
    """Enrichment of GO-BP and Reactome co-membership among top-k neighbours, for CellFM gene
    embeddings, a co-expression network (if `reference`) and random embeddings, on one gene set:
    vocabulary genes annotated in GO BP (and, with a reference, detected in >= `min_detection` of
    its cells, so that co-expression is defined).
    """
    if k < 1:
        raise UsageError(f"{arg('k', k)}: give at least 1 neighbour per gene")
    emb = get_gene_embeddings(model)
    emb = emb[~emb.index.duplicated()]
    go = load_go_annotations(data_dir, "BP")
    annotations = {
        "GO BP": annotation_sets(go),
        "Reactome": {k_: v for k_, v in load_gmt(data_dir).items() if 5 <= len(v) <= 500},
    }
    genes = set(emb.index) & set(go["symbol"])
    if reference is not None:
        syms = vocab_symbols_of(reference.var_names, model)
        ref = reference[:, syms != ""].copy()
        ref.var_names = syms[syms != ""].astype(str)
        ref.var_names_make_unique()
        det = np.asarray((sp.csr_matrix(ref.X) > 0).mean(0)).ravel()
        genes &= set(ref.var_names[det >= min_detection])
    genes = np.array(sorted(genes))
    if len(genes) <= k + 1:
        raise ValueError(f"only {len(genes)} genes are annotated and embedded; need more than k={k}")
    features = {"CellFM": emb.loc[genes]}
    if reference is not None:
        features["co-expression"] = coexpression_features(ref, genes.tolist())
    features["random"] = random_gene_embeddings(genes, emb.shape[1], seed=seed)
    rows, neighbours = [], None
    bar = progress_bar(len(features), "gene network", unit="method", enabled=progress)
    for method, F in features.items():
        bar.update(1)
        if method == "CellFM":
            neighbours = gene_neighbours(emb.loc[genes], k)
        for source, sets in annotations.items():
            annotated = np.flatnonzero(_membership(genes, sets).getnnz(axis=1) > 0)
            sub_idx, _ = cosine_neighbours(F.to_numpy(dtype=np.float32)[annotated], k)
            res = coannotation_enrichment(sub_idx, genes[annotated], sets, seed=seed)
            rows.append({"method": method, "annotation": source, "n_genes": len(annotated), **asdict(res)})
    bar.close()
    return GeneNetworkResult(pd.DataFrame(rows), neighbours, len(genes))

"""Batch-mixing and bio-conservation scores of an embedding, after scIB (Luecken et al. 2022).

Written with scikit-learn so that no jax / extra torch is needed; all scores are in [0, 1], higher
is better:
- bio conservation: label ASW ((silhouette + 1) / 2 on cell-type labels), NMI and ARI of k-means
  clusters (k = number of labels, best of a few k around it) against the labels;
- batch mixing: batch ASW (per label, 1 - |silhouette on batch|, averaged), iLISI-like kNN batch
  mixing (inverse Simpson index of batches among the k nearest neighbours, rescaled so 1 = as
  mixed as the global batch proportions allow), and graph connectivity (per label, fraction of its
  cells in the largest connected component of the kNN graph restricted to that label).
Overall = 0.6 * bio + 0.4 * batch, as scIB weighs them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def label_asw(emb: np.ndarray, labels: np.ndarray, seed: int = 0, max_cells: int = 5000) -> float:
    from sklearn.metrics import silhouette_score

    idx = _subsample(len(labels), max_cells, seed)
    return float((silhouette_score(emb[idx], labels[idx]) + 1) / 2)


def batch_asw(emb: np.ndarray, batches: np.ndarray, labels: np.ndarray) -> float:
    """Mean over labels of 1 - |silhouette of batch| inside the label (scIB's batch ASW)."""
    from sklearn.metrics import silhouette_samples

    scores = []
    for lab in np.unique(labels):
        sel = labels == lab
        if len(np.unique(batches[sel])) < 2 or sel.sum() < 3:
            continue
        s = silhouette_samples(emb[sel], batches[sel])
        scores.append(np.mean(1 - np.abs(s)))
    return float(np.mean(scores)) if scores else float("nan")


def knn_indices(emb: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k nearest neighbours of every cell, itself excluded. (N, k)"""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=min(k + 1, len(emb))).fit(emb)
    return nn.kneighbors(emb, return_distance=False)[:, 1:]


def knn_batch_mixing(emb: np.ndarray, batches: np.ndarray, k: int = 30) -> float:
    """iLISI-like: mean inverse Simpson index of batches among neighbours, rescaled to [0, 1].

    0 = every neighbourhood holds one batch; 1 = neighbourhoods as diverse as the whole data set.
    """
    codes, uniq = pd.factorize(batches)
    if len(uniq) < 2:
        return float("nan")
    nbr = codes[knn_indices(emb, k)]  # (N, k)
    props = np.stack([(nbr == b).mean(1) for b in range(len(uniq))], 1)  # (N, n_batches)
    inv_simpson = 1.0 / np.maximum((props**2).sum(1), 1e-12)
    glob = np.bincount(codes) / len(codes)
    best = 1.0 / (glob**2).sum()
    return float(np.clip((inv_simpson.mean() - 1) / (best - 1), 0, 1))


def graph_connectivity(emb: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    nbr = knn_indices(emb, k)
    n = len(labels)
    graph = csr_matrix((np.ones(nbr.size), (np.repeat(np.arange(n), nbr.shape[1]), nbr.ravel())), (n, n))
    scores = []
    for lab in np.unique(labels):
        sel = np.flatnonzero(labels == lab)
        _, comp = connected_components(graph[sel][:, sel], directed=False)
        scores.append(np.bincount(comp).max() / len(sel))
    return float(np.mean(scores))


def cluster_agreement(emb: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """(NMI, ARI) of k-means clusters vs labels, best NMI over k in {n, n+2, n*2} (scIB optimises
    the clustering resolution the same way)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    n = len(np.unique(labels))
    best = (-1.0, -1.0)
    for k in sorted({n, n + 2, 2 * n}):
        if k >= len(labels):
            continue
        pred = KMeans(n_clusters=k, n_init=5, random_state=seed).fit_predict(emb)
        nmi = normalized_mutual_info_score(labels, pred)
        if nmi > best[0]:
            best = (float(nmi), float(adjusted_rand_score(labels, pred)))
    return best


def integration_scores(
    emb: np.ndarray, batches: np.ndarray, labels: np.ndarray | None, seed: int = 0
) -> dict[str, float]:
    """All scores of one embedding. Cells with a missing label (None / NaN) count for batch mixing
    (iLISI) only."""
    emb = np.asarray(emb, dtype=np.float32)
    batches = np.asarray(batches).astype(str)
    out = {"ilisi_knn": knn_batch_mixing(emb, batches)}
    lab = pd.Series(labels if labels is not None else [None] * len(emb), dtype=object)
    has = lab.notna().to_numpy() & ~lab.astype(str).isin(["nan", "None", ""]).to_numpy()
    if has.sum() > 10 and lab[has].nunique() > 1:
        e, b, y = emb[has], batches[has], lab[has].astype(str).to_numpy()
        out["batch_asw"] = batch_asw(e, b, y)
        out["graph_connectivity"] = graph_connectivity(e, y)
        out["label_asw"] = label_asw(e, y, seed)
        out["nmi"], out["ari"] = cluster_agreement(e, y, seed)
        out["batch_score"] = float(
            np.nanmean([out["batch_asw"], out["ilisi_knn"], out["graph_connectivity"]])
        )
        out["bio_score"] = float(np.mean([out["label_asw"], out["nmi"], out["ari"]]))
        out["overall"] = 0.6 * out["bio_score"] + 0.4 * out["batch_score"]
    return out


def _subsample(n: int, max_n: int, seed: int) -> np.ndarray:
    if n <= max_n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_n, replace=False))

"""Integration scores of several embeddings of the same cells, computed by scib-metrics.

`score_embeddings` runs scib-metrics' `Benchmarker` (the field's reference implementation of the
scIB metrics, Luecken et al. 2022): bio conservation (isolated labels, KMeans NMI/ARI, silhouette
label, cLISI) and batch correction (BRAS, iLISI, kBET, graph connectivity, PCR comparison), each
averaged into "Bio conservation" / "Batch correction" and "Total" = 0.4 batch + 0.6 bio, unscaled
(min_max_scale=False, so a number does not depend on which other methods ran).

scib-metrics is an optional extra (`pip install cellfm[eval]`). Without it a small scikit-learn
stand-in runs instead (silhouette label, KMeans NMI/ARI, silhouette batch, kNN batch mixing, graph
connectivity, same aggregation); its results are labelled "approximate" wherever they appear and
are not comparable with published scib-metrics numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cellfm.extras import installed_version

if TYPE_CHECKING:
    import anndata as ad

AGGREGATES = ["Batch correction", "Bio conservation", "Total"]


@dataclass
class IntegrationScores:
    table: pd.DataFrame  # one row per method: "method", metric columns, then AGGREGATES
    scorer: str  # "scib-metrics 0.5.10 (Benchmarker)" or "approximate, scib-metrics not installed"
    n_cells: int  # labelled cells that were scored

    @property
    def approximate(self) -> bool:
        return not self.scorer.startswith("scib-metrics")


def score_embeddings(
    embeddings: dict[str, np.ndarray],
    batches: np.ndarray,
    labels: np.ndarray,
    *,
    unintegrated: str,
    scorer: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> IntegrationScores:
    """Score every embedding (method -> (N, d) array) of the same N cells.

    Cells whose label is missing (None / NaN / "") are left out: scIB metrics need a label per
    cell. `unintegrated` names the embedding PCR comparison measures against (the HVG+PCA of the
    uncorrected data). `scorer`: "auto" (scib-metrics when installed), "scib-metrics" or
    "approximate".
    """
    if scorer not in ("auto", "scib-metrics", "approximate"):
        raise ValueError(f"scorer must be 'auto', 'scib-metrics' or 'approximate', not {scorer!r}")
    if unintegrated not in embeddings:
        raise KeyError(f"unintegrated={unintegrated!r} is not one of the embeddings {list(embeddings)}")
    version = installed_version("scib-metrics")
    if scorer == "scib-metrics" and version is None:
        raise ImportError("scorer='scib-metrics' needs scib-metrics: pip install 'cellfm[eval]'")
    lab = pd.Series(labels, dtype=object)
    keep = (lab.notna() & ~lab.astype(str).isin(["nan", "None", ""])).to_numpy()
    if keep.sum() < 10 or lab[keep].nunique() < 2:
        raise ValueError("integration scores need at least 10 labelled cells of at least 2 labels")
    embs = {m: np.asarray(e, dtype=np.float32)[keep] for m, e in embeddings.items()}
    b, y = np.asarray(batches).astype(str)[keep], lab[keep].astype(str).to_numpy()
    if scorer != "approximate" and version is not None:
        table = _scib_benchmark(embs, b, y, unintegrated, progress)
        return IntegrationScores(table, f"scib-metrics {version} (Benchmarker)", int(keep.sum()))
    rows = [{"method": m, **approximate_scores(e, b, y, seed)} for m, e in embs.items()]
    return IntegrationScores(pd.DataFrame(rows), "approximate, scib-metrics not installed", int(keep.sum()))


def _scib_benchmark(
    embs: dict[str, np.ndarray], batches: np.ndarray, labels: np.ndarray, unintegrated: str, progress: bool
) -> pd.DataFrame:
    import anndata as ad
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    keys = {m: f"X_emb{i}" for i, m in enumerate(embs)}  # obsm keys free of spaces / parentheses
    adata = ad.AnnData(
        obs=pd.DataFrame({"batch": batches, "label": labels}, index=[str(i) for i in range(len(labels))]),
        obsm={keys[m]: e for m, e in embs.items()},
    )
    bm = Benchmarker(
        adata,
        batch_key="batch",
        label_key="label",
        embedding_obsm_keys=list(keys.values()),
        bio_conservation_metrics=BioConservation(),
        batch_correction_metrics=BatchCorrection(),
        pre_integrated_embedding_obsm_key=keys[unintegrated],
        progress_bar=progress,
    )
    bm.benchmark()
    res = bm.get_results(min_max_scale=False).drop(index="Metric Type", errors="ignore")
    res = res.rename(index={k: m for m, k in keys.items()}).astype(float)
    metrics = [c for c in res.columns if c not in AGGREGATES]
    return res[metrics + AGGREGATES].rename_axis("method").reset_index()


# ---- approximate stand-in (scikit-learn only) ----------------------------------------------


def approximate_scores(
    emb: np.ndarray, batches: np.ndarray, labels: np.ndarray, seed: int = 0
) -> dict[str, float]:
    """scIB-like scores of one embedding with scikit-learn, all in [0, 1], higher is better."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    idx = _subsample(len(labels), 5000, seed)
    pred = KMeans(n_clusters=len(np.unique(labels)), n_init=5, random_state=seed).fit_predict(emb)
    bio = {
        "Silhouette label": float((silhouette_score(emb[idx], labels[idx]) + 1) / 2),
        "KMeans NMI": float(normalized_mutual_info_score(labels, pred)),
        "KMeans ARI": float(adjusted_rand_score(labels, pred)),
    }
    batch = {
        "Silhouette batch": _silhouette_batch(emb, batches, labels),
        "kNN batch mixing": _knn_batch_mixing(emb, batches),
        "Graph connectivity": _graph_connectivity(emb, labels),
    }
    agg_batch = float(np.nanmean(list(batch.values())))
    agg_bio = float(np.mean(list(bio.values())))
    return {
        **bio,
        **batch,
        "Batch correction": agg_batch,
        "Bio conservation": agg_bio,
        "Total": 0.4 * agg_batch + 0.6 * agg_bio,
    }


def _silhouette_batch(emb: np.ndarray, batches: np.ndarray, labels: np.ndarray) -> float:
    """Mean over labels of 1 - |silhouette of batch| inside the label."""
    from sklearn.metrics import silhouette_samples

    scores = []
    for lab in np.unique(labels):
        sel = labels == lab
        if len(np.unique(batches[sel])) < 2 or sel.sum() < 3:
            continue
        scores.append(np.mean(1 - np.abs(silhouette_samples(emb[sel], batches[sel]))))
    return float(np.mean(scores)) if scores else float("nan")


def _knn_indices(emb: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=min(k + 1, len(emb))).fit(emb)
    return nn.kneighbors(emb, return_distance=False)[:, 1:]  # (N, k), itself excluded


def _knn_batch_mixing(emb: np.ndarray, batches: np.ndarray, k: int = 30) -> float:
    """Mean inverse Simpson index of batches among the k neighbours, rescaled so that 1 = as mixed
    as the global batch proportions allow."""
    codes, uniq = pd.factorize(batches)
    if len(uniq) < 2:
        return float("nan")
    nbr = codes[_knn_indices(emb, k)]  # (N, k)
    props = np.stack([(nbr == b).mean(1) for b in range(len(uniq))], 1)  # (N, n_batches)
    inv_simpson = 1.0 / np.maximum((props**2).sum(1), 1e-12)
    best = 1.0 / ((np.bincount(codes) / len(codes)) ** 2).sum()
    return float(np.clip((inv_simpson.mean() - 1) / (best - 1), 0, 1))


def _graph_connectivity(emb: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    """Per label, the fraction of its cells in the largest connected component of its kNN graph."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    nbr = _knn_indices(emb, k)
    n = len(labels)
    graph = csr_matrix((np.ones(nbr.size), (np.repeat(np.arange(n), nbr.shape[1]), nbr.ravel())), (n, n))
    scores = []
    for lab in np.unique(labels):
        sel = np.flatnonzero(labels == lab)
        _, comp = connected_components(graph[sel][:, sel], directed=False)
        scores.append(np.bincount(comp).max() / len(sel))
    return float(np.mean(scores))


def _subsample(n: int, max_n: int, seed: int) -> np.ndarray:
    if n <= max_n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_n, replace=False))


def scoring_frame(adata: ad.AnnData, batch_key: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(batches, labels) columns of `adata.obs`, with a clear error when one is missing."""
    for key in (batch_key, label_key):
        if key not in adata.obs.columns:
            raise KeyError(f"obs has no column {key!r} (columns: {list(adata.obs.columns)})")
    return adata.obs[batch_key].astype(str).to_numpy(), adata.obs[label_key].to_numpy()

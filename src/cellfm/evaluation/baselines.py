"""Classical baselines every evaluated task is compared against, fitted on the training split only.

- `HvgPca`: scanpy's recipe (`sc.pp.highly_variable_genes` flavor "seurat" on log-normalised
  counts, `sc.pp.scale` clipped at 10, `sc.pp.pca`) fitted on one set of cells and applied to
  others; scanpy is an optional extra (`pip install cellfm[scanpy]`). Without it a numpy stand-in
  (top-variance genes) runs and says so in `backend_`.
- `gene_expression_stats`: per-gene mean, variance and detection rate across real cells, the
  "what a gene does in PBMCs" feature a gene embedding has to beat.
- `random_gene_embeddings`: a fixed random vector per gene symbol, the chance level of gene tasks.

Nothing here knows about CellFM.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellfm.extras import installed_version
from cellfm.tokenizer import lognorm


class HvgPca:
    """HVG selection + scaling + PCA on raw counts, fitted on one set of cells, applied to others.

    After `fit`: `genes_` (HVG column indices), `mean_`/`std_` (scaling), `center_` and
    `components_` (PCA), `backend_` ("scanpy x.y" or the approximate stand-in).
    """

    def __init__(self, n_hvg: int = 2000, n_pcs: int = 50, seed: int = 0) -> None:
        self.n_hvg, self.n_pcs, self.seed = n_hvg, n_pcs, seed

    def fit(self, X) -> HvgPca:
        L = lognorm(X)
        n = min(self.n_pcs, L.shape[0] - 1, min(self.n_hvg, L.shape[1]))
        if installed_version("scanpy") is not None:
            self._fit_scanpy(L, n)
        else:
            self._fit_numpy(L, n)
        return self

    def _fit_scanpy(self, L: sp.csr_matrix, n: int) -> None:
        import anndata as ad
        import scanpy as sc

        a = ad.AnnData(L)
        a.uns["log1p"] = {"base": None}  # natural log, as `lognorm` writes it
        if self.n_hvg < L.shape[1]:
            sc.pp.highly_variable_genes(a, n_top_genes=self.n_hvg, flavor="seurat")
            self.genes_ = np.flatnonzero(a.var["highly_variable"].to_numpy())  # (G,)
        else:
            self.genes_ = np.arange(L.shape[1])
        sub = a[:, self.genes_].copy()
        sc.pp.scale(sub, max_value=10)
        self.mean_, self.std_ = sub.var["mean"].to_numpy(), sub.var["std"].to_numpy()
        self.center_ = np.asarray(sub.X).mean(0)  # sc.pp.pca centres the clipped values
        sc.pp.pca(sub, n_comps=n, random_state=self.seed)
        self.components_ = np.asarray(sub.varm["PCs"]).T  # (n, G)
        self.backend_ = f"scanpy {installed_version('scanpy')}"

    def _fit_numpy(self, L: sp.csr_matrix, n: int) -> None:
        from sklearn.decomposition import PCA

        mean = np.asarray(L.mean(0)).ravel()
        var = np.asarray(L.multiply(L).mean(0)).ravel() - mean**2
        self.genes_ = np.sort(np.argsort(-var)[: min(self.n_hvg, L.shape[1])])
        D = L[:, self.genes_].toarray()
        self.mean_, self.std_ = D.mean(0), D.std(0) + 1e-8
        pca = PCA(n_components=n, random_state=self.seed).fit(self._scaled(L))
        self.center_, self.components_ = pca.mean_, pca.components_
        self.backend_ = "approximate (scanpy not installed: top-variance genes + sklearn PCA)"

    def _scaled(self, L) -> np.ndarray:
        D = L[:, self.genes_].toarray()
        return np.clip((D - self.mean_) / self.std_, -10, 10)

    def transform(self, X) -> np.ndarray:
        Z = self._scaled(lognorm(X)) - self.center_
        return (Z @ self.components_.T).astype(np.float32)  # (N, n_pcs)

    def fit_transform(self, X) -> np.ndarray:
        return self.fit(X).transform(X)


def pca_logistic_regression(train_X, train_y, test_X, seed: int = 0) -> np.ndarray:
    """Logistic regression on HVG+PCA features; returns predicted labels of `test_X`."""
    from sklearn.linear_model import LogisticRegression

    hp = HvgPca(seed=seed).fit(train_X)
    clf = LogisticRegression(max_iter=3000, C=1.0, class_weight="balanced")
    clf.fit(hp.transform(train_X), train_y)
    return clf.predict(hp.transform(test_X))


def pca_knn(train_X, train_y, test_X, k: int = 15, seed: int = 0) -> np.ndarray:
    """k-nearest-neighbour vote on HVG+PCA features."""
    from sklearn.neighbors import KNeighborsClassifier

    hp = HvgPca(seed=seed).fit(train_X)
    clf = KNeighborsClassifier(n_neighbors=min(k, len(train_y)), weights="distance")
    clf.fit(hp.transform(train_X), train_y)
    return clf.predict(hp.transform(test_X))


def gene_expression_stats(adata, genes: list[str] | pd.Index) -> pd.DataFrame:
    """log mean, log variance, detection rate and a 'measured' flag per gene over `adata`'s cells.

    Genes absent from `adata` get zeros and measured=0. Index: `genes`.
    """
    L = lognorm(adata.X)
    mean = np.asarray(L.mean(0)).ravel()
    var = np.asarray(L.multiply(L).mean(0)).ravel() - mean**2
    det = np.asarray((sp.csr_matrix(adata.X) > 0).mean(0)).ravel()
    stats = pd.DataFrame(
        {"log_mean": np.log1p(mean * 100), "log_var": np.log1p(var * 100), "detection": det, "measured": 1.0},
        index=pd.Index(adata.var_names.astype(str)),
    )
    stats = stats[~stats.index.duplicated()]
    return stats.reindex(pd.Index(genes)).fillna(0.0)


def random_gene_embeddings(genes: list[str] | pd.Index, dim: int, seed: int = 0) -> pd.DataFrame:
    """A fixed N(0, 1) vector per gene, the same for a symbol whatever else is asked for."""
    rows = []
    for g in genes:
        h = int.from_bytes(hashlib.blake2b(f"{seed}:{g}".encode(), digest_size=8).digest(), "little")
        rows.append(np.random.default_rng(h).standard_normal(dim).astype(np.float32))
    return pd.DataFrame(np.stack(rows) if rows else np.zeros((0, dim)), index=pd.Index(genes))

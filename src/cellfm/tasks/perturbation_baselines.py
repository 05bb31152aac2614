"""Simple perturbation predictors, the yardsticks of Ahlmann-Eltze, Huber & Anders (Nature Methods
2025, "Deep-learning-based gene perturbation effect prediction does not yet outperform simple
linear baselines").

Each takes the training perturbations' mean profiles (n_train, n_genes) and predicts a mean profile
for each unseen perturbation:

- no change: the control mean;
- mean: the mean of the training profiles;
- linear: Y ≈ G W Pᵀ + b, with G the top-K principal directions of the training profiles over
  genes, P an embedding of the perturbed gene, b the mean training profile, W by ridge
  (their equation; K = 10, λ = 0.1). Their "training data" P needs the perturbed gene to be
  measured (9 of 25 in the Papalexi panel), so P here is a gene embedding known for every gene:
  GO annotations (SVD of the gene x term matrix), CellFM's gene table, or random vectors.
  The additive baseline applies to double perturbations only.
"""

from __future__ import annotations

import numpy as np


def linear_model_predict(
    train_Y: np.ndarray, train_P: np.ndarray, test_P: np.ndarray, k: int = 10, ridge: float = 0.1
) -> np.ndarray:
    """(n_test, n_genes) = G W p + b for every test embedding p."""
    b = train_Y.mean(0)  # (n_genes,)
    Yc = (train_Y - b).T  # (n_genes, n_train)
    U, _, _ = np.linalg.svd(Yc, full_matrices=False)
    G = U[:, : min(k, U.shape[1])]  # (n_genes, K)
    P = train_P  # (n_train, d)
    left = np.linalg.solve(G.T @ G + ridge * np.eye(G.shape[1]), G.T @ Yc)  # (K, n_train)
    W = left @ P @ np.linalg.inv(P.T @ P + ridge * np.eye(P.shape[1]))  # (K, d)
    return (G @ W @ test_P.T).T + b


def go_gene_embedding(genes: list[str], gene2go: dict[str, set[str]], dim: int = 10) -> np.ndarray:
    """(n_genes, dim) SVD coordinates of the genes' GO annotation rows (unannotated genes: zeros)."""
    terms = sorted(set().union(*(gene2go.get(g, set()) for g in genes)))
    col = {t: j for j, t in enumerate(terms)}
    A = np.zeros((len(genes), max(len(terms), 1)), dtype=np.float64)
    for i, g in enumerate(genes):
        for t in gene2go.get(g, ()):
            A[i, col[t]] = 1.0
    A /= np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-12)
    U, S, _ = np.linalg.svd(A, full_matrices=False)
    return U[:, :dim] * S[:dim]

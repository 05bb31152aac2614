"""Counts -> tokens exactly as the official CellFM pipeline (data_process.py: SCrna + Prepare).

1. library scaling over ALL genes of the input: counts / max(1, total / 1e5), rounded;
2. keep the genes in the vocabulary; T = per-cell total over them (after scaling);
3. only expressed genes become tokens; above `max_genes`, sample `max_genes` of them without
   replacement with probability proportional to log1p(count), then sort by gene id;
4. value = log1p(count / T * 1e4).
Pretraining masks: `mask_values`, the official `Prepare.mask`.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from cellfm.batch import CellBatch

LIBRARY_CAP = 1e5  # cells with more counts are scaled down to about this many
TARGET_SUM = 1e4


def scale_library(counts: sp.csr_matrix) -> sp.csr_matrix:
    """counts / max(1, total / 1e5), rounded (float32), zeros removed. (cells, genes) CSR."""
    counts = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    total = np.asarray(counts.sum(1), dtype=np.float32).ravel()
    factor = np.maximum(np.float32(1), total / np.float32(LIBRARY_CAP))
    counts.data = np.round(counts.data / np.repeat(factor, np.diff(counts.indptr)))
    counts.eliminate_zeros()
    return counts


def normalise(counts: np.ndarray, total: float | np.ndarray) -> np.ndarray:
    """log1p(count / total * 1e4) as float32."""
    return np.log1p(counts / total * TARGET_SUM).astype(np.float32)


def tokenize_cell(
    gene_ids: np.ndarray, counts: np.ndarray, total: float, max_genes: int = 2048,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One cell's (token ids int32, values float32), sorted by id.

    `counts` are library-scaled counts of vocabulary genes (zeros allowed, dropped); `total` is the
    cell's total over all vocabulary genes, also those not sampled.
    """
    gene_ids = np.asarray(gene_ids)
    counts = np.asarray(counts, dtype=np.float64)
    nz = np.flatnonzero(counts)
    nz = nz[np.argsort(gene_ids[nz], kind="stable")]  # canonical order: same sample whatever the input order
    if len(nz) > max_genes:
        if rng is None:
            raise ValueError(f"cell has {len(nz)} > max_genes={max_genes} genes: pass rng to sample")
        w = np.log1p(counts[nz])
        nz = np.sort(nz[rng.choice(len(nz), max_genes, replace=False, p=w / w.sum())])
        nz = nz[np.argsort(gene_ids[nz], kind="stable")]
    return gene_ids[nz].astype(np.int32), normalise(counts[nz], total)


def mask_values(
    n_tokens: int, rng: np.random.Generator, mask_ratio: float = 0.2, hide_fraction: float = 0.8
) -> tuple[np.ndarray, np.ndarray]:
    """(hidden, loss) bool masks of one cell, the official `Prepare.mask` semantics.

    l = int(ratio * n) random positions enter the loss; the first int(0.8 * l) of them are hidden.
    Quirk kept from the official code: when l == 0 (cells with < 5 genes) every position is in
    the loss and none is hidden.
    """
    hidden = np.zeros(n_tokens, dtype=bool)
    loss = np.zeros(n_tokens, dtype=bool)
    n_loss = int(mask_ratio * n_tokens)
    if n_loss == 0:
        loss[:] = True
        return hidden, loss
    picked = rng.permutation(n_tokens)[:n_loss]
    loss[picked] = True
    hidden[picked[: int(hide_fraction * n_loss)]] = True
    return hidden, loss


def collate_cells(cells: list[tuple], cell_index=None, totals=None) -> CellBatch:
    """Pad per-cell (ids, values[, hidden, loss]) to the longest cell. -> CellBatch (B, L).
    The one padding routine of inference batches and of the pretraining reference path."""
    B = len(cells)
    L = max(1, max(len(c[0]) for c in cells))
    ids = np.zeros((B, L), np.int64)
    vals = np.zeros((B, L), np.float32)
    tok = np.zeros((B, L), bool)
    with_masks = len(cells[0]) == 4
    hid = np.zeros((B, L), bool) if with_masks else None
    los = np.zeros((B, L), bool) if with_masks else None
    for b, c in enumerate(cells):
        n = len(c[0])
        ids[b, :n], vals[b, :n], tok[b, :n] = c[0], c[1], True
        if with_masks:
            hid[b, :n], los[b, :n] = c[2], c[3]
    t = torch.from_numpy
    return CellBatch(
        t(ids), t(vals), t(tok), None if hid is None else t(hid), None if los is None else t(los),
        None if cell_index is None else torch.as_tensor(np.asarray(cell_index), dtype=torch.int64),
        None if totals is None else torch.as_tensor(np.asarray(totals), dtype=torch.float32),
    )


def lognorm(X, target_sum: float = TARGET_SUM, totals: np.ndarray | None = None) -> sp.csr_matrix:
    """A whole matrix log-normalised as the model sees values: log1p(count / total * target_sum),
    CSR float32 (the baselines' and reports' expression scale); `totals` overrides the row sums."""
    X = sp.csr_matrix(X, dtype=np.float32)
    tot = np.asarray(X.sum(1)).ravel() if totals is None else np.asarray(totals, dtype=np.float64)
    out = sp.diags((target_sum / np.maximum(tot, 1.0)).astype(np.float32)) @ X
    out.data = np.log1p(out.data)
    return out.tocsr()

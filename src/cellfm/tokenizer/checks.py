"""Input checks: is this a matrix of raw counts? Each error names the problem and the fix.

The matrix is read in row chunks, so backed and sparse data are never densified whole. Log and
CPM-like data are told apart from ambient-corrected counts (SoupX, CellBender: non-negative but
not whole numbers) by their value range and row sums, not by integrality alone, so that
`allow_non_integer=True` admits the latter and still refuses the former.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

from cellfm.wording import arg

LOG_MAX = 30.0  # log1p of any normalisation stays below this; raw counts of real cells exceed it
CONSTANT_TOTAL_CV = 1e-3  # row sums this equal were normalised to a fixed total


def iter_row_chunks(matrix, chunk_size: int = 4096) -> Iterator[tuple[int, sp.csr_matrix]]:
    """(start row, CSR chunk) over a dense, sparse or backed (h5py-based) matrix."""
    n = matrix.shape[0]
    for start in range(0, n, chunk_size):
        block = matrix[start : min(n, start + chunk_size)]
        if hasattr(block, "to_memory"):  # anndata backed sparse dataset slice
            block = block.to_memory()
        yield start, sp.csr_matrix(block)


def check_counts(
    data,
    *,
    chunk_size: int = 4096,
    allow_empty: bool = True,
    allow_non_integer: bool = False,
    where: str = "the count matrix",
    fix: str | None = None,
) -> dict[str, int]:
    """Raise ValueError unless `data` (AnnData or a cells x genes matrix) holds raw counts.

    `where` names the matrix in messages (e.g. "adata.X"); `fix` says where raw counts are, when
    the caller knows (default: a generic pointer to `layer`). `allow_non_integer` admits
    non-negative non-integer counts (ambient-corrected) but never log or CPM-like data. Returns
    {"n_cells", "n_empty"}; empty cells only warn unless allow_empty=False.
    """
    fix = fix or f"pass the raw UMI counts (e.g. {arg('layer', 'counts')})"
    matrix = data
    if hasattr(data, "var_names"):  # AnnData
        dup = data.var_names[data.var_names.duplicated()]
        if len(dup):
            raise ValueError(
                f"{len(dup)} gene names occur more than once (e.g. {list(dup[:3])}); sum the duplicates "
                f"or pass {arg('gene_key', placeholder='column')} with unique gene ids"
            )
        matrix = data.X
    if matrix is None:
        raise ValueError(f"{where} is empty (no matrix): {fix}")
    n_empty = n_frac = n_nonzero = 0
    vmax = 0.0
    totals, minima = [], []
    for _, block in iter_row_chunks(matrix, chunk_size):
        v = block.data
        if v.size and not np.isfinite(v).all():
            raise ValueError(f"{where} contains NaN or infinite values, so it is not raw counts: {fix}, "
                             "or drop the cells / genes with such values first")
        if v.size and (v < 0).any():
            raise ValueError(f"{where} has negative values, so it is not raw counts (scaled or centred "
                             f"data?): {fix}")
        block.eliminate_zeros()
        v = block.data
        n_frac += int((np.abs(v - np.round(v)) > 1e-3).sum())
        n_nonzero += int(v.size)
        vmax = max(vmax, float(v.max())) if v.size else vmax
        row_sums = np.asarray(block.sum(1), dtype=np.float64).ravel()
        n_empty += int((np.diff(block.indptr) == 0).sum())
        full = np.diff(block.indptr) > 0
        totals.append(row_sums[full])
        minima.append(np.minimum.reduceat(v, block.indptr[:-1][full]) if full.any() else np.zeros(0))
    if n_nonzero and n_frac / n_nonzero > 0.01:
        _refuse_non_counts(n_frac / n_nonzero, vmax, np.concatenate(totals), np.concatenate(minima),
                           allow_non_integer, where, fix)
    if n_empty:
        msg = f"{n_empty} of {matrix.shape[0]} cells have no counts"
        if not allow_empty:
            raise ValueError(msg + "; remove them, e.g. sc.pp.filter_cells(adata, min_counts=1)")
        warnings.warn(msg, stacklevel=2)
    return {"n_cells": int(matrix.shape[0]), "n_empty": int(n_empty)}


def _refuse_non_counts(frac: float, vmax: float, totals: np.ndarray, minima: np.ndarray,
                       allow_non_integer: bool, where: str, fix: str) -> None:
    """Raise for non-integer data unless it looks like ambient-corrected counts and that is allowed."""
    head = f"{frac:.0%} of the non-zero values of {where} are not whole numbers"
    cv = float(totals.std() / totals.mean()) if len(totals) > 1 and totals.mean() > 0 else 1.0
    typical_min = float(np.median(minima)) if len(minima) else 0.0
    if vmax < LOG_MAX:
        why = f"the largest value is {vmax:.3g}: the data look log-transformed"
    elif cv < CONSTANT_TOTAL_CV:
        why = (f"every cell sums to {np.median(totals):.4g}: the data were normalised to a fixed total "
               "(CPM / normalize_total)")
    elif typical_min > 1.5:
        why = (f"the smallest value per cell is typically {typical_min:.3g}, where raw counts have 1s: "
               "the data look normalised or scaled")
    elif allow_non_integer:
        return
    else:
        raise ValueError(
            f"{head} (largest {vmax:.3g}; cell totals vary as counts do). If these are ambient-corrected "
            f"counts (SoupX, CellBender), pass {arg('allow_non_integer', True)}; otherwise {fix}."
        )
    raise ValueError(f"{head} and {why}; CellFM normalises raw counts itself, so {fix}.")

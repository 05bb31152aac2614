"""Input checks: is this a matrix of raw counts? Each error names the problem and the fix.

The matrix is read in row chunks, so backed and sparse data are never densified whole.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp


def iter_row_chunks(matrix, chunk_size: int = 4096) -> Iterator[tuple[int, sp.csr_matrix]]:
    """(start row, CSR chunk) over a dense, sparse or backed (h5py-based) matrix."""
    n = matrix.shape[0]
    for start in range(0, n, chunk_size):
        block = matrix[start : min(n, start + chunk_size)]
        if hasattr(block, "to_memory"):  # anndata backed sparse dataset slice
            block = block.to_memory()
        yield start, sp.csr_matrix(block)


def check_counts(data, *, chunk_size: int = 4096, allow_empty: bool = True) -> dict[str, int]:
    """Raise ValueError unless `data` (AnnData or a cells x genes matrix) holds raw counts.

    Returns {"n_cells", "n_empty"}; empty cells only warn unless allow_empty=False.
    """
    matrix = data
    if hasattr(data, "var_names"):  # AnnData
        dup = data.var_names[data.var_names.duplicated()]
        if len(dup):
            raise ValueError(
                f"{len(dup)} gene names occur more than once (e.g. {list(dup[:3])}); make them unique "
                "with adata.var_names_make_unique() or sum the duplicates first"
            )
        matrix = data.X
    if matrix is None:
        raise ValueError("the AnnData has no X matrix; pass layer=<name> where the counts are")
    n_empty = n_frac = n_nonzero = 0
    vmax = 0.0
    for _, block in iter_row_chunks(matrix, chunk_size):
        v = block.data
        if v.size == 0:
            n_empty += block.shape[0]
            continue
        if not np.isfinite(v).all():
            raise ValueError("the count matrix contains NaN or infinite values; raw UMI counts are "
                             "finite integers: fix or drop those cells/genes first")
        if (v < 0).any():
            raise ValueError("the count matrix has negative values, so it is not raw counts (scaled or "
                             "centred data?); pass the raw UMI counts, e.g. layer='counts' or adata.raw")
        n_frac += int((np.abs(v - np.round(v)) > 1e-3).sum())
        n_nonzero += int((v != 0).sum())
        vmax = max(vmax, float(v.max()))
        n_empty += int((np.asarray(block.sum(1)).ravel() == 0).sum())
    if n_nonzero and n_frac / n_nonzero > 0.01:
        kind = "log-transformed" if vmax < 30 else "normalised"
        raise ValueError(
            f"{n_frac / n_nonzero:.0%} of the non-zero values are not integers (max {vmax:.3g}): the data "
            f"look {kind}, but CellFM normalises raw counts itself. Pass raw UMI counts "
            "(e.g. layer='counts', or adata.raw.to_adata())."
        )
    if n_empty:
        msg = f"{n_empty} of {matrix.shape[0]} cells have no counts"
        if not allow_empty:
            raise ValueError(msg + "; remove them, e.g. sc.pp.filter_cells(adata, min_counts=1)")
        warnings.warn(msg, stacklevel=2)
    return {"n_cells": int(matrix.shape[0]), "n_empty": int(n_empty)}

"""The one judge of raw counts: is this matrix raw counts? Each error names the problem and the fix.

Every workflow (embedding, annotation, integration, perturbation, corpus build, the pretraining
probe) reaches it through `cellfm.contract.setup_cells`; the corpus readers ask `raw_count_problem`
which of X / layers / raw holds counts.

The matrix is read in row chunks, so backed and sparse data are never densified whole. Log and
CPM-like data are told apart from ambient-corrected counts (SoupX, CellBender: non-negative but
not whole numbers) by their value range and row sums, not by integrality alone, so that
`allow_non_integer=True` admits the latter and still refuses the former.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from cellfm.wording import arg

LOG_MAX = 30.0  # log1p of any normalisation stays below this; raw counts of real cells exceed it
CONSTANT_TOTAL_CV = 1e-3  # row sums this equal were normalised to a fixed total
_MOUSE_CASE = re.compile(r"^[A-Z][a-z][a-z0-9]*$")  # Actb, Cd74, Gm12345
_HUMAN_CASE = re.compile(r"^[A-Z0-9][A-Z0-9-]*[A-Z0-9]$")  # ACTB, CD74, HLA-DRA


def iter_row_chunks(matrix, chunk_size: int = 4096, *, start: int = 0,
                    stop: int | None = None) -> Iterator[tuple[int, sp.csr_matrix]]:
    """(first row, CSR chunk) over rows start:stop of a dense, sparse or backed (h5py-based) matrix."""
    stop = matrix.shape[0] if stop is None else min(stop, matrix.shape[0])
    for a in range(start, stop, chunk_size):
        yield a, read_rows(matrix, a, min(stop, a + chunk_size))


def read_rows(matrix, a: int, b: int) -> sp.csr_matrix:
    """Rows a:b of a dense, sparse or backed matrix as CSR."""
    block = matrix[a:b]
    if hasattr(block, "to_memory"):  # anndata backed sparse dataset slice
        block = block.to_memory()
    return sp.csr_matrix(block)


def check_counts(
    matrix,
    *,
    chunk_size: int = 4096,
    allow_empty: bool = True,
    allow_non_integer: bool = False,
    where: str = "the count matrix",
    fix: str | None = None,
) -> dict[str, int]:
    """Raise ValueError unless `matrix` (cells x genes; dense, sparse or backed) holds raw counts.

    `where` names the matrix in messages (e.g. "adata.X"); `fix` says where raw counts are, when
    the caller knows (default: a generic pointer to `layer`). `allow_non_integer` admits
    non-negative non-integer counts (ambient-corrected) but never log or CPM-like data. Returns
    {"n_cells", "n_empty"}; empty cells only warn unless allow_empty=False.
    """
    if matrix is None:
        raise ValueError(f"{where} is empty (no matrix): {fix or _default_fix()}")
    stats = CountStats()
    for _, block in iter_row_chunks(matrix, chunk_size):
        stats.add(block)
        if stats.bad:
            break
    return judge_counts(stats, allow_empty=allow_empty, allow_non_integer=allow_non_integer, where=where,
                        fix=fix)


def _default_fix() -> str:  # worded for the API or the CLI, whichever is running
    return f"pass the raw UMI counts (e.g. {arg('layer', 'counts')})"


@dataclass
class CountStats:
    """What `judge_counts` needs to know about a count matrix, gathered one row block at a time.

    Stats of consecutive row ranges `merge` into the stats of the whole matrix, so processes can
    each read only their own rows and still reach the verdict (and message) of one full pass.
    `totals` / `minima` (one value per non-empty cell) matter only for non-integer data;
    `without_cells` drops them before they travel between processes.
    """

    n_cells: int = 0
    n_empty: int = 0
    n_nonzero: int = 0
    n_frac: int = 0  # non-zero values that are not whole numbers
    vmax: float = 0.0
    bad: str | None = None  # "nan" or "negative": the first found in row order (reading stops)
    totals: list[np.ndarray] = field(default_factory=list)  # per non-empty cell: its sum
    minima: list[np.ndarray] = field(default_factory=list)  # per non-empty cell: its smallest value

    def add(self, block: sp.csr_matrix) -> None:
        """Account for the next rows (CSR; explicit zeros are removed from it in place)."""
        v = block.data
        self.n_cells += block.shape[0]
        if self.bad:
            return
        if v.size and not np.isfinite(v).all():
            self.bad = "nan"
            return
        if v.size and (v < 0).any():
            self.bad = "negative"
            return
        block.eliminate_zeros()
        v = block.data
        self.n_frac += int((np.abs(v - np.round(v)) > 1e-3).sum())
        self.n_nonzero += int(v.size)
        self.vmax = max(self.vmax, float(v.max())) if v.size else self.vmax
        row_sums = np.asarray(block.sum(1), dtype=np.float64).ravel()
        self.n_empty += int((np.diff(block.indptr) == 0).sum())
        full = np.diff(block.indptr) > 0
        self.totals.append(row_sums[full])
        self.minima.append(np.minimum.reduceat(v, block.indptr[:-1][full]) if full.any() else np.zeros(0))

    @property
    def non_integer(self) -> bool:
        """More than 1% of the non-zero values are not whole numbers (the per-cell arrays decide)."""
        return bool(self.n_nonzero and self.n_frac / self.n_nonzero > 0.01)

    def without_cells(self) -> CountStats:
        return replace(self, totals=[], minima=[])

    @classmethod
    def merge(cls, parts: list[CountStats]) -> CountStats:
        """The stats of consecutive row ranges, in row order, as those of one pass over all."""
        bad = next((p.bad for p in parts if p.bad), None)
        return cls(n_cells=sum(p.n_cells for p in parts), n_empty=sum(p.n_empty for p in parts),
                   n_nonzero=sum(p.n_nonzero for p in parts), n_frac=sum(p.n_frac for p in parts),
                   vmax=max((p.vmax for p in parts), default=0.0), bad=bad,
                   totals=[t for p in parts for t in p.totals], minima=[m for p in parts for m in p.minima])


def judge_counts(stats: CountStats, *, allow_empty: bool = True, allow_non_integer: bool = False,
                 where: str = "the count matrix", fix: str | None = None) -> dict[str, int]:
    """`check_counts`'s verdict on gathered stats: raise ValueError naming the problem and `fix`."""
    fix = fix or _default_fix()
    if stats.bad == "nan":
        raise ValueError(f"{where} contains NaN or infinite values, so it is not raw counts: {fix}, "
                         "or drop the cells / genes with such values first")
    if stats.bad == "negative":
        raise ValueError(f"{where} has negative values, so it is not raw counts (scaled or centred "
                         f"data?): {fix}")
    if stats.non_integer:
        _refuse_non_counts(stats.n_frac / stats.n_nonzero, stats.vmax, _concat(stats.totals),
                           _concat(stats.minima), allow_non_integer, where, fix)
    if stats.n_empty:
        msg = f"{stats.n_empty} of {stats.n_cells} cells have no counts"
        if not allow_empty:
            raise ValueError(msg + "; remove them, e.g. sc.pp.filter_cells(adata, min_counts=1)")
        warnings.warn(msg, stacklevel=3)
    return {"n_cells": int(stats.n_cells), "n_empty": int(stats.n_empty)}


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0)


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


def raw_count_problem(block, *, allow_non_integer: bool = False) -> str | None:
    """Why the rows `block` (dense or sparse) are not raw counts, or None when they are: the
    judge's own message, for callers that choose between candidate matrices or record a reason."""
    stats = CountStats()
    stats.add(sp.csr_matrix(block, dtype=np.float64, copy=True))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            judge_counts(stats, allow_non_integer=allow_non_integer, where="the matrix", fix="use raw counts")
    except ValueError as err:
        return str(err)
    return None


def mouse_case_fraction(names) -> float:
    """Fraction of gene symbols written in mouse case (Actb) among those in either case style."""
    mouse = sum(1 for n in names if _MOUSE_CASE.match(str(n)))
    human = sum(1 for n in names if _HUMAN_CASE.match(str(n)))
    return mouse / max(1, mouse + human)

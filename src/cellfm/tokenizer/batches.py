"""Row chunks of counts -> CellBatch stream for inference: official tokenization, and cells
grouped by number of expressed genes so that little compute goes to padding. Which rows and
columns are read is settled by `cellfm.contract` (`CellInput.batches`).

A cell with more than `max_genes` expressed genes is subsampled with a generator seeded by `seed`
and a hash of the cell's own tokens, never by its row: the same cell gets the same tokens (and so
the same embedding) in any file, subset, order, chunking, batch size or process count."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

from cellfm.batch import CellBatch
from cellfm.tokenizer.tokenize import collate_cells, normalise, scale_library, tokenize_cell


def cell_rng(seed: int, ids: np.ndarray, counts: np.ndarray) -> np.random.Generator:
    """The sampling generator of one cell: `seed` and a hash of its (token ids, scaled counts)."""
    digest = zlib.crc32(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    digest = zlib.crc32(np.ascontiguousarray(counts, dtype=np.float64).tobytes(), digest)
    return np.random.default_rng([seed, digest])


def tokenize_chunk(
    counts: sp.csr_matrix, column_ids: np.ndarray, first_row: int, *, max_genes: int, seed: int,
    scaled: bool = False,
) -> list[tuple[int, np.ndarray, np.ndarray, float]]:
    """[(row, ids, values, total)] of the cells of one chunk (total: the library-scaled count over
    the vocabulary genes that the values are normalised by); empty cells are left out. `scaled`:
    the counts are already library-scaled (a corpus shard stores them so)."""
    if scaled:
        lib = sp.csr_matrix(counts, dtype=np.float32, copy=True)
        lib.eliminate_zeros()
    else:
        lib = scale_library(counts)  # scaling uses all genes of the input
    ids_all = column_ids[lib.indices]
    keep = ids_all > 0
    rows = np.repeat(np.arange(lib.shape[0]), np.diff(lib.indptr))[keep]
    lens = np.bincount(rows, minlength=lib.shape[0])
    ids = ids_all[keep]
    cnt = lib.data[keep].astype(np.float64)
    order = np.lexsort((ids, rows))
    ids, cnt, rows = ids[order], cnt[order], rows[order]
    totals = np.bincount(rows, weights=cnt, minlength=lib.shape[0])
    starts = np.concatenate([[0], np.cumsum(lens)])
    values = normalise(cnt, totals[rows])
    out = []
    for r in range(lib.shape[0]):
        s, e = starts[r], starts[r + 1]
        if e == s:
            continue
        if e - s > max_genes:  # reproducible per cell, whatever its row or company
            rng = cell_rng(seed, ids[s:e], cnt[s:e])
            cid, cval = tokenize_cell(ids[s:e], cnt[s:e], totals[r], max_genes, rng)
        else:
            cid, cval = ids[s:e].astype(np.int32), values[s:e]
        out.append((first_row + r, cid, cval, float(totals[r])))
    return out


def chunk_batches(
    block: sp.csr_matrix, column_ids: np.ndarray, first_row: int, *, batch_size: int, max_genes: int,
    sort_by_length: bool = True, seed: int = 0, scaled: bool = False,
) -> Iterator[CellBatch]:
    """Batches of the cells of one row chunk (`first_row` = its first row in the whole input;
    `scaled` as in `tokenize_chunk`)."""
    cells = tokenize_chunk(block, column_ids, first_row, max_genes=max_genes, seed=seed, scaled=scaled)
    if sort_by_length:
        cells.sort(key=lambda c: len(c[1]))
    for b in range(0, len(cells), batch_size):
        yield _pad(cells[b : b + batch_size])


def _pad(cells: list[tuple[int, np.ndarray, np.ndarray, float]]) -> CellBatch:
    return collate_cells([(c[1], c[2]) for c in cells], cell_index=[c[0] for c in cells],
                         totals=[c[3] for c in cells])

"""AnnData -> CellBatch stream for inference: chunked reading, official tokenization, and cells
grouped by number of expressed genes so that little compute goes to padding."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch

from cellfm.batch import CellBatch
from cellfm.tokenizer.checks import iter_row_chunks
from cellfm.tokenizer.tokenize import normalise, scale_library, tokenize_cell


def count_matrix(adata, layer: str | None = None):
    """The raw-count matrix: `adata.layers[layer]`, `adata.raw.X` for layer="raw", else X."""
    if layer is None:
        return adata.X
    if layer == "raw":
        if adata.raw is None:
            raise ValueError("layer='raw' but adata.raw is empty")
        return adata.raw.X
    if layer not in adata.layers:
        raise KeyError(f"layer {layer!r} not in adata.layers ({list(adata.layers)})")
    return adata.layers[layer]


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
        if e - s > max_genes:  # reproducible per cell, whatever the chunking
            rng = np.random.default_rng([seed, first_row + r])
            cid, cval = tokenize_cell(ids[s:e], cnt[s:e], totals[r], max_genes, rng)
        else:
            cid, cval = ids[s:e].astype(np.int32), values[s:e]
        out.append((first_row + r, cid, cval, float(totals[r])))
    return out


def iter_token_batches(
    adata, mapping, *, batch_size: int = 64, max_genes: int = 2048, layer: str | None = None,
    chunk_size: int = 8192, sort_by_length: bool = True, seed: int = 0,
) -> Iterator[CellBatch]:
    """Batches of tokenized cells; each carries `cell_index` (row in adata) to restore order."""
    column_ids = np.asarray(mapping.token_ids, dtype=np.int64)
    matrix = count_matrix(adata, layer)
    for start, block in iter_row_chunks(matrix, chunk_size):
        yield from chunk_batches(block, column_ids, start, batch_size=batch_size, max_genes=max_genes,
                                 sort_by_length=sort_by_length, seed=seed)


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
    B, L = len(cells), max(len(c[1]) for c in cells)
    lens = np.array([len(c[1]) for c in cells])
    tok = np.arange(L)[None, :] < lens[:, None]  # (B, L)
    ids = np.zeros((B, L), np.int64)
    vals = np.zeros((B, L), np.float32)
    ids[tok] = np.concatenate([c[1] for c in cells])
    vals[tok] = np.concatenate([c[2] for c in cells])
    index = torch.tensor([c[0] for c in cells], dtype=torch.int64)
    totals = torch.tensor([c[3] for c in cells], dtype=torch.float32)
    return CellBatch(torch.from_numpy(ids), torch.from_numpy(vals), torch.from_numpy(tok), cell_index=index,
                     totals=totals)

"""The one way in: `setup_cells(adata, model, ...)` checks an AnnData against a model once and
returns a `CellInput`, from which every workflow draws tokenized batches.

Like scvi-tools' `setup_anndata`, it declares which fields are read (`layer`, `use_raw`,
`gene_key`) and checks them up front: the counts (the one judge in `contract.counts`), the gene
names (`contract.genes`), the cells that express no matched gene, and the gene cap. Embedding,
streamed embedding, annotation, integration fine-tuning, perturbation and the pretraining probe
all enter here, so a check written once protects all of them.

The counts are read once, in row chunks. Under `torchrun` each process reads only its own rows
(`rows=`) and the processes exchange what they found (`gather=`), so every process raises the
error one full pass would raise, with the same message, before any model work. Error messages
name Python arguments or CLI flags (`cellfm.wording`). Nothing here runs a model.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import anndata as ad
import numpy as np

from cellfm.batch import CellBatch
from cellfm.config import ModelConfig
from cellfm.contract.counts import CountStats, iter_row_chunks, judge_counts, raw_count_problem
from cellfm.contract.genes import gene_names, match_genes, refuse_duplicate_genes
from cellfm.io.read import read_cells
from cellfm.tokenizer import chunk_batches
from cellfm.vocab import GeneMapping, GeneVocabulary
from cellfm.wording import arg, in_cli

log = logging.getLogger(__name__)
READ_ERRORS = (OSError, ValueError, KeyError)  # what reading a damaged or truncated file raises
EMPTY_CHOICES = ("raise", "zero")


class VocabularyModel(Protocol):
    """What the contract needs of a model: its config and the vocabulary its gene ids refer to."""

    config: ModelConfig
    vocab: GeneVocabulary


@dataclass(frozen=True)
class ModelSpec:
    """A `VocabularyModel` without weights: what a model of `config` would read (the pretraining
    probe prepares its cells before the model it probes exists as a `CellFM`)."""

    config: ModelConfig
    vocab: GeneVocabulary


@dataclass
class CellInput:
    """Cells checked against a model. `counts[a:b]` gives rows a:b; column j of it is vocabulary
    token `column_ids[j]` (0: not in the vocabulary). `record` is what `uns[...]` records."""

    adata: ad.AnnData  # obs / var of the cells read (for use_raw: adata.raw as an AnnData)
    counts: object  # X, a layer, raw.X, or rows of a file: sliceable by rows
    mapping: GeneMapping
    max_genes: int
    seed: int
    empty_cells: np.ndarray  # (n_empty,) rows expressing none of the matched genes
    record: dict = field(default_factory=dict)
    scaled: bool = False  # counts are library-scaled already (a corpus stores them so)
    n_expressed: np.ndarray | None = None  # (b - a,) matched genes expressed per cell of the rows read

    def n_tokens(self) -> np.ndarray:
        """(n_cells,) tokens each cell enters the model with: its expressed matched genes, capped."""
        if self.n_expressed is None or len(self.n_expressed) != self.n_cells:
            raise RuntimeError("internal error: token counts are known only for inputs read whole")
        return np.minimum(self.n_expressed, self.max_genes)

    @property
    def n_cells(self) -> int:
        return int(self.counts.shape[0])

    @property
    def column_ids(self) -> np.ndarray:
        return np.asarray(self.mapping.token_ids, dtype=np.int64)

    def batches(self, batch_size: int, *, rows: tuple[int, int] | None = None, chunk_size: int = 8192,
                sort_by_length: bool = True) -> Iterator[CellBatch]:
        """Tokenized batches of rows a:b (default all); each batch's `cell_index` is the row of each
        cell, so batches grouped by length can be put back in order. Empty cells are left out."""
        a, b = rows or (0, self.n_cells)
        for start, block in iter_row_chunks(self.counts, chunk_size, start=a, stop=b):
            yield from chunk_batches(block, self.column_ids, start, batch_size=batch_size,
                                     max_genes=self.max_genes, seed=self.seed, scaled=self.scaled,
                                     sort_by_length=sort_by_length)


def setup_cells(
    adata: ad.AnnData | str | Path,
    model: VocabularyModel,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_key: str | None = None,
    allow_non_integer: bool = False,
    max_genes: int | None = None,
    empty: str = "raise",
    seed: int = 0,
    matrix=None,
    rows: tuple[int, int] | None = None,
    gather: Callable[[object], list] | None = None,
) -> CellInput:
    """Check `adata` against `model` and return the `CellInput` every workflow reads.

    Parameters
    ----------
    adata
        Cells x genes with raw counts (may be backed), or a path (.h5ad, 10x folder / .h5, .loom)
        read into memory with `cellfm.io.read_cells`.
    layer
        Counts from `adata.layers[layer]` instead of `adata.X`.
    use_raw
        Counts (and genes) from `adata.raw`, as scanpy's `use_raw`.
    gene_key
        Column of `adata.var` with gene symbols or Ensembl ids; None = the var names.
    allow_non_integer
        Admit non-negative counts that are not whole numbers (SoupX, CellBender); log or CPM-like
        data are refused regardless.
    max_genes
        Expressed genes per cell entering the model (default: the model's `max_genes`); larger
        cells are subsampled with a seed drawn from the cell's own counts and `seed`.
    empty
        Cells that express no matched gene: "raise" (the error says how many and how to filter
        them) or "zero" (they are left out of the batches; callers give them a zero row).
    matrix, rows, gather
        For streamed files and torchrun: `matrix` holds the counts when `adata` has only obs and
        var; only rows (a, b) are read here; `gather(x)` returns x of every process in rank order
        (the processes' rows must tile the input in that order). Default: all rows, one process.
    """
    if isinstance(adata, (str, Path)):
        adata = read_cells(adata)
    if empty not in EMPTY_CHOICES:
        raise ValueError(f"{arg('empty', empty)} is not a choice: use {arg('empty', 'raise')} or "
                         f"{arg('empty', 'zero')}")
    if use_raw and layer is not None:
        raise ValueError(f"{arg('use_raw', True)} and {arg('layer', layer)} both name where the counts are: "
                         "give one of them")
    if use_raw:
        if adata.raw is None:
            raise ValueError(f"{arg('use_raw', True)} was asked for but the input has no .raw")
        matrix = adata.raw.X if matrix is None else matrix
        adata = adata.raw.to_adata() if not adata.isbacked else ad.AnnData(obs=adata.obs, var=adata.raw.var)
    elif layer is not None and layer not in adata.layers:
        raw = f"; the counts in .raw are chosen with {arg('use_raw', True)}" if adata.raw is not None else ""
        raise KeyError(f"{arg('layer', layer)} is not a layer of the input "
                       f"(layers: {list(adata.layers)}{raw})")
    if adata.n_obs == 0:
        raise ValueError("the input has no cells (0 rows): nothing to do")
    names = gene_names(adata, gene_key)
    refuse_duplicate_genes(names, gene_key)
    mapping = match_genes(names, model.vocab)
    log.info("cellfm gene matching: %s", mapping)
    counts = (adata.X if layer is None else adata.layers[layer]) if matrix is None else matrix
    max_genes = model.config.max_genes if max_genes is None else int(max_genes)
    if max_genes < 1:
        raise ValueError(f"{arg('max_genes', max_genes)} must be positive")

    columns = np.flatnonzero(mapping.token_ids > 0)
    gather = gather or (lambda x: [x])
    try:
        a, _ = rows or (0, adata.n_obs)
        stats, n_expressed = scan_counts(counts, columns, *(rows or (0, adata.n_obs)))
        found = (stats.without_cells(), a + np.flatnonzero(n_expressed == 0))
    except READ_ERRORS as err:
        found = err
    parts = raise_if_failed(gather(found))
    merged = CountStats.merge([p[0] for p in parts])
    if merged.non_integer:  # the per-cell totals and minima decide what the values are
        cells = gather((stats.totals, stats.minima))
        merged.totals = [t for tot, _ in cells for t in tot]
        merged.minima = [m for _, mins in cells for m in mins]
    with warnings.catch_warnings():  # empty cells are handled below, by `empty`
        warnings.filterwarnings("ignore", message=r".* cells have no counts")
        judge_counts(merged, allow_non_integer=allow_non_integer, where=_where(layer, use_raw),
                     fix=_fix(adata if not use_raw else None, layer, use_raw))

    empty_cells = np.concatenate([p[1] for p in parts])
    if len(empty_cells) and empty == "raise":
        filt = "" if in_cli() else ", e.g. `sc.pp.filter_cells(adata, min_genes=1)` on the matched genes,"
        raise ValueError(
            f"{len(empty_cells)} of {adata.n_obs} cells express none of the {len(columns)} matched "
            f"genes (first: {list(adata.obs_names[empty_cells[:3]])}); filter them out first{filt} "
            f"or pass {arg('empty', 'zero')} to give them a zero embedding"
        )
    record = {
        "layer": "raw" if use_raw else (layer or "X"),
        "gene_key": gene_key or "var_names",
        "max_genes": max_genes,
        "seed": seed,
        "n_empty_cells": int(len(empty_cells)),
        **mapping.summary(),
        "n_dropped": int(len(mapping.token_ids) - mapping.n_matched),
    }
    return CellInput(adata, counts, mapping, max_genes, seed, empty_cells, record, n_expressed=n_expressed)


def _where(layer: str | None, use_raw: bool) -> str:
    if in_cli():
        return "X" if layer is None and not use_raw else ("raw" if use_raw else f"layer {layer!r}")
    return "adata.raw.X" if use_raw else ("adata.X" if layer is None else f"adata.layers[{layer!r}]")


def _fix(adata: ad.AnnData | None, layer: str | None, use_raw: bool) -> str | None:
    """Where else in `adata` raw counts are (layers, .raw), as the arguments that select them."""
    if adata is None:
        return None
    found = []
    candidates = [(n, arg("layer", n), adata.layers[n]) for n in adata.layers.keys() if n != layer]
    if adata.raw is not None and not use_raw:
        candidates.append(("raw", arg("use_raw", True), adata.raw.X))
    for name, flag, matrix in candidates:
        first = next(iter_row_chunks(matrix[: min(200, matrix.shape[0])], 200), None)
        if first is not None and first[1].nnz and raw_count_problem(first[1]) is None:
            found.append((name, flag))
    if not found:
        return None
    places = ", ".join("adata.raw" if n == "raw" else f"layers[{n!r}]" for n, _ in found)
    return f"pass {' or '.join(f for _, f in found)} (raw counts found in {places})"


def raise_if_failed(parts: list) -> list:
    """`parts` gathered from every process, unless reading failed in one of them (then it holds
    the error): every process raises that error rather than wait for the one that stopped."""
    failed = next((p for p in parts if isinstance(p, BaseException)), None)
    if failed is not None:
        raise failed
    return parts


def scan_counts(counts, columns: np.ndarray, a: int, b: int, chunk: int = 4096):
    """One pass over rows a:b: (`CountStats` of them, (b - a,) number of matched gene `columns`
    each cell expresses). Reading stops at the first NaN / negative value."""
    stats, n_expressed = CountStats(), np.zeros(max(0, b - a), np.int64)
    for start, block in iter_row_chunks(counts, chunk, start=a, stop=b):
        stats.add(block)  # removes explicit zeros: they are not expressed genes
        if stats.bad:
            break
        matched = block[:, columns] if len(columns) < block.shape[1] else block
        n_expressed[start - a : start - a + block.shape[0]] = matched.getnnz(axis=1)
    return stats, n_expressed

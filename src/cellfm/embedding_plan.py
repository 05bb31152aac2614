"""What is settled before the first forward pass of an embedding run: the counts are checked,
the genes matched to the model's vocabulary, the gene cap and the empty cells fixed.

`plan_embedding` reads the counts once, in row chunks. Under `torchrun` each process reads only
its own rows (`rows=`) and the processes exchange what they found (`gather=`), so every process
raises the error one full pass would raise, with the same message, before any embedding work.
Error messages name Python arguments or CLI flags (`cellfm.wording`). Nothing here runs a model.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import anndata as ad

    from cellfm.cellfm import CellFM
    from cellfm.vocab.gene_mapping import GeneMapping

log = logging.getLogger(__name__)


def gene_names(adata: ad.AnnData, gene_key: str | None) -> pd.Index:
    from cellfm.wording import arg, in_cli

    if gene_key is None:
        return pd.Index(adata.var_names.astype(str))
    if gene_key not in adata.var.columns:
        default = "leave out --gene-key" if in_cli() else "leave gene_key=None"
        raise KeyError(
            f"{arg('gene_key', gene_key)} is not a column of adata.var (columns: {list(adata.var.columns)}); "
            f"{default} to use the var names"
        )
    return pd.Index(adata.var[gene_key].astype(str))


def refuse_duplicate_genes(names: pd.Index, gene_key: str | None) -> None:
    """Duplicated gene names would be resolved silently (first column wins): refuse them instead."""
    from cellfm.wording import arg

    dup = names[names.duplicated()].unique()
    if len(dup):
        where = f"adata.var[{gene_key!r}]" if gene_key else "the var names"
        raise ValueError(
            f"{len(dup)} gene names occur more than once in {where} (e.g. {list(dup[:3])}), so it is "
            f"ambiguous which column to use: sum the duplicated genes, or pass "
            f"{arg('gene_key', placeholder='column')} naming a column of unique gene ids (e.g. Ensembl)"
        )


def raw_count_alternatives(adata: ad.AnnData, layer: str | None) -> list[str]:
    """Other places in `adata` (layers, .raw) whose first rows look like raw counts, as the
    `layer` values that select them."""
    from cellfm.corpus.input_checks import looks_like_raw_counts
    from cellfm.tokenizer import count_matrix

    found = []
    for name in [*adata.layers.keys(), *(["raw"] if adata.raw is not None else [])]:
        if name == (layer or None):
            continue
        first = next(iter_first_rows(count_matrix(adata, name)), None)
        if first is not None and first.nnz and looks_like_raw_counts(first)[0]:
            found.append(name)
    return found


def iter_first_rows(matrix, n: int = 200):
    from cellfm.tokenizer import iter_row_chunks

    for _, block in iter_row_chunks(matrix[: min(n, matrix.shape[0])], n):
        yield block


def expressed_matched_genes(adata: ad.AnnData, columns: np.ndarray, layer: str | None,
                            chunk: int = 4096, matrix=None) -> np.ndarray:
    """Number of expressed (non-zero) matched genes per cell, read in row chunks. (n_cells,)"""
    import scipy.sparse as sp

    from cellfm.tokenizer import count_matrix

    X = count_matrix(adata, layer) if matrix is None else matrix
    n = adata.n_obs
    out = np.zeros(n, dtype=np.int64)
    for a in range(0, n, chunk):
        block = X[a : a + chunk]
        block = block[:, columns] if len(columns) < adata.n_vars else block
        out[a : a + chunk] = block.getnnz(axis=1) if sp.issparse(block) else (np.asarray(block) != 0).sum(1)
    return out


@dataclass
class EmbeddingPlan:
    """What is settled before the first forward pass: the gene mapping, the gene cap, the empty
    cells, and the `uns["cellfm"]` record. Shared by `embed` and `cellfm.embedding_store`."""

    mapping: GeneMapping
    max_genes: int
    empty_cells: np.ndarray  # (n_empty,) rows expressing no matched gene
    uns: dict


def plan_embedding(adata: ad.AnnData, model: CellFM, *, layer: str | None, gene_key: str | None,
                   key_added: str, max_genes: int | None, empty: str, seed: int,
                   allow_non_integer: bool, matrix=None, rows: tuple[int, int] | None = None,
                   gather: Callable[[object], list] | None = None) -> EmbeddingPlan:
    """Check the counts and match the genes (reading `adata` in row chunks); raise on bad input.

    `matrix`: the counts when `adata` holds only obs and var (`cellfm.io.open_rows`). `rows`
    (a, b): read only these rows; `gather(x)` returns x of every process in rank order
    (`cellfm.embedding_store.all_ranks`), and the processes' rows must tile the input in that
    order. Default: all rows, one process.
    """
    from cellfm.tokenizer import count_matrix
    from cellfm.tokenizer.checks import CountStats, judge_counts
    from cellfm.wording import arg, in_cli

    if layer is not None and layer not in adata.layers:
        raise KeyError(f"{arg('layer', layer)} is not a layer of the input (layers: {list(adata.layers)}"
                       f"{', and .raw' if adata.raw is not None else ''})")
    names = gene_names(adata, gene_key)
    refuse_duplicate_genes(names, gene_key)
    config = model.config
    max_genes = config.max_genes if max_genes is None else int(max_genes)

    mapping = match_genes(names, model)
    log.info("cellfm gene matching: %s", mapping)
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    if in_cli():
        where = "X" if layer is None else f"layer {layer!r}"
    others = raw_count_alternatives(adata, layer)
    fix = None
    if others:
        places = ", ".join("adata.raw" if o == "raw" else f"layers[{o!r}]" for o in others)
        fix = f"pass {' or '.join(arg('layer', o) for o in others)} (raw counts found in {places})"

    counts = count_matrix(adata, layer) if matrix is None else matrix
    columns = np.flatnonzero(mapping.token_ids > 0)
    gather = gather or (lambda x: [x])
    try:
        stats, empty_here = scan_counts(counts, columns, *(rows or (0, adata.n_obs)))
        found = (stats.without_cells(), empty_here)
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
        judge_counts(merged, allow_non_integer=allow_non_integer, where=where, fix=fix)

    empty_cells = np.concatenate([p[1] for p in parts])
    if len(empty_cells) and empty == "raise":
        filt = "" if in_cli() else ", e.g. `sc.pp.filter_cells(adata, min_genes=1)` on the matched genes,"
        raise ValueError(
            f"{len(empty_cells)} of {adata.n_obs} cells express none of the {len(columns)} matched "
            f"genes (first: {list(adata.obs_names[empty_cells[:3]])}); filter them out first{filt} "
            f"or pass {arg('empty', 'zero')} to give them a zero embedding"
        )

    uns = {
        "model": model_record(config),
        "key_added": key_added,
        "layer": layer or "X",
        "gene_key": gene_key or "var_names",
        "max_genes": max_genes,
        "seed": seed,
        "n_empty_cells": int(len(empty_cells)),
        **mapping.summary(),
        "n_dropped": int(len(mapping.token_ids) - mapping.n_matched),
    }
    return EmbeddingPlan(mapping, max_genes, empty_cells, uns)


def model_record(config) -> dict:
    """The model's settings as `uns["cellfm"]["model"]` records them (scalars only)."""
    return {"vocabulary": config.vocabulary, **{k: v for k, v in config.to_dict().items()
                                                if isinstance(v, (int, float, str, bool))}}


READ_ERRORS = (OSError, ValueError, KeyError)  # what reading a damaged or truncated file raises


def raise_if_failed(parts: list) -> list:
    """`parts` gathered from every process, unless reading failed in one of them (then it holds
    the error): every process raises that error rather than wait for the one that stopped."""
    failed = next((p for p in parts if isinstance(p, BaseException)), None)
    if failed is not None:
        raise failed
    return parts


def scan_counts(counts, columns: np.ndarray, a: int, b: int, chunk: int = 4096):
    """One pass over rows a:b: (`CountStats` of them, the rows among them (global index) that
    express none of the matched gene `columns`). Reading stops at the first NaN / negative value."""
    from cellfm.tokenizer.checks import CountStats, iter_row_chunks

    stats, empty = CountStats(), [np.zeros(0, np.int64)]
    for start, block in iter_row_chunks(counts, chunk, start=a, stop=b):
        stats.add(block)  # removes explicit zeros: they are not expressed genes
        if stats.bad:
            break
        matched = block[:, columns] if len(columns) < block.shape[1] else block
        empty.append(start + np.flatnonzero(matched.getnnz(axis=1) == 0))
    return stats, np.concatenate(empty)


def match_genes(names: pd.Index, model: CellFM):
    """map_genes onto the model's vocabulary, refusing mouse-case symbols (Cd3e) that would
    otherwise match human genes only by ignoring case."""
    from cellfm.vocab import map_genes
    from cellfm.wording import arg

    with warnings.catch_warnings():  # the panel warning is re-issued below only when genes match
        warnings.simplefilter("ignore")
        mapping = map_genes(names, model.vocab, min_genes=0)
    if mapping.n_matched == 0:
        example = ", ".join(repr(g) for g in names[:5])
        raise ValueError(
            f"none of the {len(names)} genes (e.g. {example}) match the model's vocabulary "
            f"{model.vocab.name!r}: use human HGNC symbols or Ensembl gene ids (if they are in a column "
            f"of adata.var, pass {arg('gene_key', placeholder='column')}); map mouse genes to human "
            "orthologs first"
        )
    if len(names) >= 200 and mapping.n_matched < 1000:
        warnings.warn(f"{mapping}: a restricted gene panel gives a less informed embedding", stacklevel=4)
    matched = mapping.how[mapping.token_ids > 0]
    if (matched == "case").mean() > 0.5:
        example = ", ".join(repr(g) for g in mapping.names[mapping.how == "case"][:5])
        raise ValueError(
            f"{(matched == 'case').sum()} of {len(matched)} matched genes match the human vocabulary "
            f"only when case is ignored (e.g. {example}): these look like mouse gene symbols. Map "
            "them to human orthologs first (or fix the case if the data are human)."
        )
    return mapping



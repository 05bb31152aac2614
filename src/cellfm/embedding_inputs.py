"""The inputs `embed_file` streams, opened the same way: rows by slices, a checked plan, names.

- an .h5ad is opened backed (X, a layer, or .raw);
- a 10x folder / .h5 or a .loom through the corpus readers (`cellfm.io.open_rows`);
- a corpus folder (`cellfm corpus build`) as a `CorpusMatrix`: its cells were checked and their
  genes matched when it was built, and it stores library-scaled counts of the vocabulary genes,
  so only the vocabulary is compared with the model's and the empty cells counted.

`rows` is the (first, end) row range this process reads for its checks; `gather` exchanges the
findings between processes (`cellfm.embedding_plan`). Nothing here runs a model or writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from cellfm.cellfm import CellFM
    from cellfm.embedding_plan import EmbeddingPlan


@dataclass
class StreamInput:
    """One opened input. `counts[a:b]` gives rows a:b (CSR after `read_rows`); column j holds
    token id `column_ids[j]` (0: not in the vocabulary)."""

    n_cells: int
    counts: object
    column_ids: np.ndarray  # (n_columns,) int64
    scaled: bool  # counts are library-scaled already (a corpus)
    names: Callable[[], pd.Index]  # cell names, read when asked for (the merge needs them)
    plan: EmbeddingPlan | None = None
    base: Path | ad.AnnData | None = None  # what the full output extends; None: names + embedding only
    x_blocks: Callable[[], Iterator[sp.csr_matrix]] | None = None  # X of an AnnData base, in row chunks
    close: Callable[[], None] = lambda: None


def open_input(path: Path, model: CellFM, *, rows_of: Callable[[int], tuple[int, int]],
               gather: Callable[[object], list], layer: str | None, gene_key: str | None, key_added: str,
               max_genes: int | None, empty: str, seed: int, allow_non_integer: bool) -> StreamInput:
    """Open `path`, check this process's rows `rows_of(n_cells)` and plan the run (raises on bad
    input, in every process alike)."""
    from cellfm.corpus.matrix import is_corpus

    if is_corpus(path):
        return _open_corpus(path, model, rows_of=rows_of, gather=gather, layer=layer, gene_key=gene_key,
                            key_added=key_added, max_genes=max_genes, empty=empty, seed=seed)
    return _open_cells(path, model, rows_of=rows_of, gather=gather, layer=layer, gene_key=gene_key,
                       key_added=key_added, max_genes=max_genes, empty=empty, seed=seed,
                       allow_non_integer=allow_non_integer)


def _open_cells(path: Path, model: CellFM, *, rows_of, gather, layer, gene_key, key_added, max_genes, empty,
                seed, allow_non_integer) -> StreamInput:
    from cellfm.embedding_plan import plan_embedding
    from cellfm.io import input_format, open_rows, read_cells
    from cellfm.tokenizer import count_matrix
    from cellfm.wording import arg

    is_h5ad = input_format(path) == "h5ad"
    if is_h5ad:
        adata, rows = read_cells(path, backed=True), None
    else:  # 10x, loom: obs + var now, counts by row slices
        adata, rows = open_rows(path)
    opened = StreamInput(adata.n_obs, None, np.zeros(0, np.int64), False, lambda: adata.obs_names,
                         close=lambda: adata.file.close() if adata.isbacked else None)
    try:
        if layer == "raw" and adata.raw is None:
            raise ValueError(f"{arg('layer', 'raw')} was asked for but the input has no .raw")
        source = adata.raw.to_adata() if layer == "raw" else adata
        layer_in_source = None if layer == "raw" else layer
        if source.n_obs == 0:
            raise ValueError("the input has no cells (0 rows): nothing to embed")
        plan = plan_embedding(source, model, layer=layer_in_source, gene_key=gene_key, key_added=key_added,
                              max_genes=max_genes, empty=empty, seed=seed, matrix=rows, gather=gather,
                              allow_non_integer=allow_non_integer, rows=rows_of(source.n_obs))
    except BaseException:
        opened.close()
        raise
    if layer == "raw":
        plan.uns["layer"] = "raw"
    opened.counts = count_matrix(source, layer_in_source) if rows is None else rows
    opened.column_ids = np.asarray(plan.mapping.token_ids, dtype=np.int64)
    opened.plan = plan
    opened.base = path if is_h5ad else adata
    if not is_h5ad:
        opened.x_blocks = lambda: (m for _, m in rows.source.chunks(8192))
    return opened


def _open_corpus(path: Path, model: CellFM, *, rows_of, gather, layer, gene_key, key_added, max_genes, empty,
                 seed) -> StreamInput:
    from cellfm.corpus.matrix import CorpusMatrix
    from cellfm.embedding_plan import READ_ERRORS, EmbeddingPlan, model_record, raise_if_failed
    from cellfm.vocab.gene_mapping import GeneMapping
    from cellfm.wording import arg

    for name, value in (("layer", layer), ("gene_key", gene_key)):
        if value is not None:
            raise ValueError(f"{path} is a corpus folder: its cells are stored as vocabulary token ids, "
                             f"so there is no layer or gene column to choose; leave out {arg(name, value)}")
    corpus = CorpusMatrix(path)
    built, vocab = corpus.manifest.vocabulary, model.vocab
    if built.get("sha256") != vocab.sha256:
        raise ValueError(f"the corpus {path} was built with vocabulary {built.get('name')!r} "
                         f"({built.get('n_genes')} genes) but the model uses {vocab.name!r} ({len(vocab)} "
                         f"genes), so their token ids differ: rebuild the corpus with `cellfm corpus build "
                         f"--vocab {vocab.name}`, or use a model of vocabulary {built.get('name')!r}")
    n = corpus.shape[0]
    if n == 0:
        raise ValueError(f"the corpus {path} holds no cells: nothing to embed")
    try:
        mine = _empty_rows(corpus, *rows_of(n))
    except READ_ERRORS as err:
        mine = err
    empty_cells = np.concatenate(raise_if_failed(gather(mine)))
    if len(empty_cells) and empty == "raise":
        raise ValueError(f"{len(empty_cells)} of {n} cells of the corpus express no gene (rows "
                         f"{empty_cells[:3].tolist()}); pass {arg('empty', 'zero')} to give them a zero "
                         "embedding, or rebuild the corpus with a minimum number of genes")
    config = model.config
    genes = np.asarray(vocab.genes, dtype=object)
    mapping = GeneMapping(genes, np.arange(1, len(genes) + 1, dtype=np.int64),
                          np.full(len(genes), "exact", dtype=object), vocab.name)
    max_genes = config.max_genes if max_genes is None else int(max_genes)
    uns = {
        "model": model_record(config), "key_added": key_added, "layer": "corpus",
        "corpus": str(Path(path).resolve()), "n_inputs": len(corpus.manifest.inputs), "max_genes": max_genes,
        "seed": seed, "n_empty_cells": int(len(empty_cells)),
    }
    plan = EmbeddingPlan(mapping, max_genes, empty_cells, uns)
    return StreamInput(n, corpus, mapping.token_ids, True, lambda: corpus.obs_names, plan=plan)


def _empty_rows(corpus, a: int, b: int, size: int = 8192) -> np.ndarray:
    """Rows among a:b (global index) that hold no gene."""
    found = [np.zeros(0, np.int64)]
    for start in range(a, b, size):
        block = corpus[start : min(b, start + size)]
        found.append(start + np.flatnonzero(np.diff(block.indptr) == 0))
    return np.concatenate(found)

"""The inputs `embed_file` streams, opened the same way: rows by slices, a checked `CellInput`,
names.

- an .h5ad is opened backed (X, a layer, or .raw) and checked by `cellfm.contract.setup_cells`;
- a 10x folder / .h5 or a .loom through the format readers (`cellfm.io.read.open_rows`), same check;
- a corpus folder (`cellfm corpus build`) as a `CorpusMatrix`: its cells were checked and their
  genes matched when it was built, and it stores library-scaled counts of the vocabulary genes,
  so only the vocabulary is compared with the model's and the empty cells counted.

`rows` is the (first, end) row range this process reads for its checks; `gather` exchanges the
findings between processes (`cellfm.contract.setup`). Nothing here runs a model or writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cellfm.contract.setup import READ_ERRORS, CellInput, VocabularyModel, raise_if_failed, setup_cells
from cellfm.io.corpus import CorpusMatrix, is_corpus
from cellfm.io.read import input_format, open_rows, read_cells
from cellfm.vocab.gene_mapping import GeneMapping
from cellfm.wording import arg

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp


@dataclass
class StreamInput:
    """One opened input: the checked cells (`cells.counts[a:b]` gives rows a:b), their names, and
    what the full output extends."""

    cells: CellInput
    names: Callable[[], pd.Index]  # cell names, read when asked for (the merge needs them)
    base: Path | ad.AnnData | None = None  # what the full output extends; None: names + embedding only
    x_blocks: Callable[[], Iterator[sp.csr_matrix]] | None = None  # X of an AnnData base, in row chunks
    close: Callable[[], None] = lambda: None


def open_input(path: Path, model: VocabularyModel, *, rows_of: Callable[[int], tuple[int, int]],
               gather: Callable[[object], list], layer: str | None, use_raw: bool, gene_key: str | None,
               max_genes: int | None, empty: str, seed: int, allow_non_integer: bool) -> StreamInput:
    """Open `path`, check this process's rows `rows_of(n_cells)` (raises on bad input, in every
    process alike)."""
    if is_corpus(path):
        for name, value in (("layer", layer), ("use_raw", use_raw or None), ("gene_key", gene_key)):
            if value is not None:
                raise ValueError(f"{path} is a corpus folder: its cells are stored as vocabulary token ids, "
                                 f"so there is no layer, .raw or gene column to choose; leave out "
                                 f"{arg(name, value)}")
        return _open_corpus(path, model, rows_of=rows_of, gather=gather, max_genes=max_genes, empty=empty,
                            seed=seed)
    if input_format(path) == "h5ad":
        adata, rows = read_cells(path, backed=True), None
    else:  # 10x, loom: obs + var now, counts by row slices
        adata, rows = open_rows(path)
    close = (lambda: adata.file.close()) if adata.isbacked else (lambda: None)
    try:
        n = adata.n_obs
        cells = setup_cells(adata, model, layer=layer, use_raw=use_raw, gene_key=gene_key,
                            max_genes=max_genes, empty=empty, seed=seed, allow_non_integer=allow_non_integer,
                            matrix=rows, rows=rows_of(n), gather=gather)
    except BaseException:
        close()
        raise
    opened = StreamInput(cells, lambda: adata.obs_names, base=path if rows is None else adata, close=close)
    if rows is not None:
        opened.x_blocks = lambda: (m for _, m in rows.source.chunks(8192))
    return opened


def _open_corpus(path: Path, model: VocabularyModel, *, rows_of, gather, max_genes, empty,
                 seed) -> StreamInput:
    """A corpus was checked and its genes matched when it was built: only its vocabulary is
    compared with the model's, and its empty cells counted."""
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
    genes = np.asarray(vocab.genes, dtype=object)
    mapping = GeneMapping(genes, np.arange(1, len(genes) + 1, dtype=np.int64),
                          np.full(len(genes), "exact", dtype=object), vocab.name)
    max_genes = model.config.max_genes if max_genes is None else int(max_genes)
    record = {"layer": "corpus", "corpus": str(Path(path).resolve()), "n_inputs": len(corpus.manifest.inputs),
              "max_genes": max_genes, "seed": seed, "n_empty_cells": int(len(empty_cells))}
    cells = CellInput(None, corpus, mapping, max_genes, seed, empty_cells, record, scaled=True)
    return StreamInput(cells, lambda: corpus.obs_names)


def _empty_rows(corpus, a: int, b: int, size: int = 8192) -> np.ndarray:
    """Rows among a:b (global index) that hold no gene."""
    found = [np.zeros(0, np.int64)]
    for start in range(a, b, size):
        block = corpus[start : min(b, start + size)]
        found.append(start + np.flatnonzero(np.diff(block.indptr) == 0))
    return np.concatenate(found)

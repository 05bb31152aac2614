"""Cell and gene embeddings of an AnnData in memory (scanpy convention: results go into documented
keys, nothing else in `adata` changes).

`embed(adata, model)` checks the input once (`cellfm.contract.setup_cells`), tokenizes the cells
in row chunks (a backed AnnData is never densified), runs the encoder on batches of cells with
similar numbers of expressed genes (`embedding.engine`) and writes the CLS output to
`adata.obsm[key_added]` in row order, and what was matched to `adata.uns[uns_key(key_added)]`.
Streaming a file to disk (resumable, under torchrun) is `embedding.stream`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch

from cellfm.cellfm import CellFM, load
from cellfm.contract.genes import gene_names
from cellfm.contract.setup import setup_cells
from cellfm.embedding.engine import embed_cells, model_record, uns_key
from cellfm.io.read import read_cells
from cellfm.vocab import map_genes


def as_model(model: CellFM | str | Path) -> CellFM:
    """A `CellFM` as given, or loaded by name or path (`cellfm.load`)."""
    return model if isinstance(model, CellFM) else load(model)


def embed(
    adata: ad.AnnData | str | Path,
    model: CellFM | str | Path,
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    key_added: str = "X_cellfm",
    gene_key: str | None = None,
    copy: bool = False,
    progress: bool = True,
    max_genes: int | None = None,
    empty: Literal["raise", "zero"] = "raise",
    seed: int = 0,
    allow_non_integer: bool = False,
    st_tokens: bool = False,
) -> ad.AnnData:
    """Embed every cell of `adata` with a CellFM model.

    Parameters
    ----------
    adata
        Cells x genes with raw counts in `adata.X` (or `layer`, or `.raw` with `use_raw`); may be
        backed (`backed="r"`). Or a path to an .h5ad, a 10x matrix folder, a 10x .h5 or a .loom
        file, read into memory.
    model
        A `CellFM`, a built-in or official model name (e.g. "cellfm-mini", "cellfm-80m") or a model
        folder / checkpoint file.
    batch_size
        Cells per forward pass (cells are grouped by number of expressed genes); None: 16 on
        CPU, 64 on a GPU.
    device
        "cpu", "cuda" or "auto"/None (CUDA when available). CPU runs in float32, CUDA in bfloat16
        autocast.
    layer, use_raw
        Counts from `adata.layers[layer]`, or from `adata.raw` (its own genes), instead of `adata.X`.
    key_added
        The embeddings go to `adata.obsm[key_added]` (float32, (n_cells, d_model)) and the record
        of what was matched to `adata.uns[key_added without "X_"]` ("X_cellfm" -> "cellfm").
    gene_key
        Column of `adata.var` holding gene symbols or Ensembl ids; None = `adata.var_names`.
    copy
        Write into a copy of `adata` instead of `adata` (a backed `adata` is then loaded into
        memory; with copy=False a backed file is only read, and the result lives in memory until
        `adata.write_h5ad(new_path)`).
    progress
        Show a progress bar.
    max_genes
        Expressed genes per cell entering the model (default: the model's `max_genes`, 2048);
        larger cells are subsampled with a seed drawn from `seed` and the cell's own counts, so a
        cell gets the same embedding in any file, subset, order or batch.
    empty
        Cells that express none of the matched genes: "raise" (default; the error says how many
        and how to filter them) or "zero" (a zero embedding row).
    seed
        Seed of the subsampling of cells with more than `max_genes` genes.
    allow_non_integer
        Accept non-negative counts that are not whole numbers (ambient-corrected counts from
        SoupX / CellBender). Log-transformed or CPM-like data are refused regardless.
    st_tokens
        Add the two ST tokens (the cell's total count) after CLS, as the authors' fine-tuning
        model does. Needs a model with ST-token weights (the official 80M release, or a model
        fine-tuned with `st_tokens=True`); other models raise a ValueError.

    Returns
    -------
    The AnnData that holds the result, whatever `adata` was: `adata` itself (copy=False), its copy
    (copy=True), or the AnnData read from the path.

    Examples
    --------
    >>> model = cellfm.load("cellfm-mini")
    >>> cellfm.embed(adata, model)
    >>> sc.pp.neighbors(adata, use_rep="X_cellfm")
    """
    if isinstance(adata, (str, Path)):
        adata, copy = read_cells(adata), False
    model = as_model(model)
    cells = setup_cells(adata, model, layer=layer, use_raw=use_raw, gene_key=gene_key,
                        allow_non_integer=allow_non_integer, max_genes=max_genes, empty=empty, seed=seed)
    emb = embed_cells(cells, model, batch_size=batch_size, device=device, st_tokens=st_tokens,
                      progress=progress)
    # a backed AnnData cannot be copied without a new file: copy=True loads it into memory
    target = (adata.to_memory() if adata.isbacked else adata.copy()) if copy else adata
    target.obsm[key_added] = emb
    target.uns[uns_key(key_added)] = {"model": model_record(model.config), "key_added": key_added,
                                      **cells.record, "st_tokens": bool(st_tokens)}
    return target


def get_gene_embeddings(
    model: CellFM | str | Path,
    genes: list[str] | None = None,
    *,
    adata: ad.AnnData | None = None,
    varm_key: str = "cellfm_gene_emb",
    gene_key: str | None = None,
) -> pd.DataFrame:
    """Rows of the model's gene table as a DataFrame indexed by vocabulary gene symbol
    (`CellFM.get_gene_embeddings`). With `adata`, also writes `adata.varm[varm_key]` (n_vars,
    d_model) float32 for adata's genes mapped through the vocabulary, NaN where a gene does not
    match."""
    model = as_model(model)
    frame = model.get_gene_embeddings(genes)
    if adata is not None:
        table = model.module.gene_emb.detach().float().cpu().numpy()  # (rows, D), row 0 = padding
        ids = map_genes(gene_names(adata, gene_key), model.vocab, min_genes=0).token_ids
        emb = np.full((adata.n_vars, table.shape[1]), np.nan, dtype=np.float32)
        emb[ids > 0] = table[ids[ids > 0]]
        adata.varm[varm_key] = emb
    return frame

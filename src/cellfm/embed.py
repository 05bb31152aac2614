"""Cell and gene embeddings from AnnData (scanpy convention: results go into documented keys).

`embed(adata, model)` checks the counts, maps the genes onto the model's vocabulary, tokenizes the
cells in row chunks (a backed AnnData is never densified), runs the encoder in batches of cells
with similar numbers of expressed genes and writes the CLS output to `adata.obsm["X_cellfm"]` in
the original row order. Nothing else in `adata` changes apart from `adata.uns["cellfm"]` (what
was matched).

Cells with more than `max_genes` expressed genes (2048 for the official models) are subsampled
to `max_genes` genes with a fixed seed, so running `embed` twice gives the same embeddings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    import anndata as ad

    from cellfm.cellfm import CellFM

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None / "auto" -> CUDA when available, else CPU; anything else is taken as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA GPU; use device='cpu'")
    return device


def resolve_model(model: CellFM | str | Path, device: torch.device | None = None) -> CellFM:
    from cellfm.cellfm import CellFM, load

    if isinstance(model, CellFM):
        return model
    return load(model, device=device)


def gene_names(adata: ad.AnnData, gene_key: str | None) -> pd.Index:
    if gene_key is None:
        return pd.Index(adata.var_names.astype(str))
    if gene_key not in adata.var.columns:
        raise KeyError(
            f"gene_key={gene_key!r} is not a column of adata.var (columns: {list(adata.var.columns)}); "
            "leave gene_key=None to use adata.var_names"
        )
    return pd.Index(adata.var[gene_key].astype(str))


def expressed_matched_genes(adata: ad.AnnData, columns: np.ndarray, layer: str | None,
                            chunk: int = 4096) -> np.ndarray:
    """Number of expressed (non-zero) matched genes per cell, read in row chunks. (n_cells,)"""
    import scipy.sparse as sp

    from cellfm.tokenizer import count_matrix

    X = count_matrix(adata, layer)
    n = adata.n_obs
    out = np.zeros(n, dtype=np.int64)
    for a in range(0, n, chunk):
        block = X[a : a + chunk]
        block = block[:, columns] if len(columns) < adata.n_vars else block
        out[a : a + chunk] = block.getnnz(axis=1) if sp.issparse(block) else (np.asarray(block) != 0).sum(1)
    return out


def embed(
    adata: ad.AnnData,
    model: CellFM | str | Path,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    layer: str | None = None,
    key_added: str = "X_cellfm",
    gene_key: str | None = None,
    copy: bool = False,
    progress: bool = True,
    max_genes: int | None = None,
    empty: Literal["raise", "zero"] = "raise",
    seed: int = 0,
) -> ad.AnnData | None:
    """Embed every cell of `adata` with a CellFM model.

    Parameters
    ----------
    adata
        Cells x genes with raw counts in `adata.X` (or `layer`); may be backed (`backed="r"`).
    model
        A `CellFM`, a built-in model name (e.g. "cellfm-mini") or a model folder / checkpoint.
    batch_size
        Cells per forward pass (cells are grouped by number of expressed genes).
    device
        "cpu", "cuda" or "auto"/None (CUDA when available). CPU runs in float32, CUDA in bfloat16
        autocast.
    layer
        Take counts from `adata.layers[layer]` instead of `adata.X`.
    key_added
        The embeddings go to `adata.obsm[key_added]`, float32 (n_cells, d_model).
    gene_key
        Column of `adata.var` holding gene symbols or Ensembl ids; None = `adata.var_names`.
    copy
        Return a new AnnData with the result instead of writing into `adata` (a backed `adata`
        is then loaded into memory; with copy=False a backed file is only read, and the result
        lives in memory until `adata.write_h5ad(new_path)`).
    progress
        Show a progress bar.
    max_genes
        Expressed genes per cell entering the model (default: the model's `max_genes`, 2048);
        larger cells are subsampled with a fixed `seed`, so results are reproducible.
    empty
        What to do with cells that express none of the matched genes: "raise" (default, the
        error says how many and how to filter them) or "zero" (a zero embedding row).
    seed
        Seed of the subsampling of cells with more than `max_genes` genes.

    Returns
    -------
    The new AnnData if `copy=True`, else None. Also writes `adata.uns["cellfm"]`: the model and
    the gene-matching summary.

    Examples
    --------
    >>> model = cellfm.load("cellfm-mini")
    >>> cellfm.embed(adata, model)
    >>> sc.pp.neighbors(adata, use_rep="X_cellfm")
    """
    from cellfm.tokenizer import check_counts, count_matrix, iter_token_batches

    if empty not in ("raise", "zero"):
        raise ValueError(f"empty must be 'raise' or 'zero', not {empty!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    dev = resolve_device(device)
    model = resolve_model(model)
    config = model.config
    max_genes = config.max_genes if max_genes is None else int(max_genes)

    if adata.n_obs == 0:
        raise ValueError("adata has no cells")
    mapping = match_genes(gene_names(adata, gene_key), model)
    log.info("cellfm gene matching: %s", mapping)
    check_counts(count_matrix(adata, layer))

    columns = np.flatnonzero(mapping.token_ids > 0)
    n_expressed = expressed_matched_genes(adata, columns, layer)
    empty_cells = np.flatnonzero(n_expressed == 0)
    if len(empty_cells) and empty == "raise":
        raise ValueError(
            f"{len(empty_cells)} of {adata.n_obs} cells express none of the {len(columns)} matched "
            f"genes (first: {list(adata.obs_names[empty_cells[:3]])}); filter them first, e.g. "
            "`sc.pp.filter_cells(adata, min_genes=1)` on the matched genes, or pass empty='zero' "
            "to give them a zero embedding"
        )

    out = np.zeros((adata.n_obs, config.d_model), dtype=np.float32)
    done = np.zeros(adata.n_obs, dtype=bool)
    module = model.module
    was_training, old_device = module.training, model.device
    module.eval().to(dev)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else _null()
    batches = iter_token_batches(adata, mapping, batch_size=batch_size, max_genes=max_genes, layer=layer,
                                 seed=seed)
    bar = _progress(progress, adata.n_obs - len(empty_cells))
    try:
        with torch.inference_mode(), autocast:
            for batch in batches:
                batch = batch.to(dev, non_blocking=True)
                cls = module.cell_embedding(batch.gene_ids, batch.values, batch.token_mask)  # (B, D)
                rows = batch.cell_index.cpu().numpy()
                out[rows] = cls.float().cpu().numpy()
                done[rows] = True
                bar.update(len(rows))
    finally:
        bar.close()
        module.train(was_training).to(old_device)
    missing = np.flatnonzero(~done)
    if len(np.setdiff1d(missing, empty_cells)):
        raise RuntimeError(f"internal error: {len(missing)} cells were not embedded")

    # a backed AnnData cannot be copied without a new file: copy=True loads it into memory
    target = (adata.to_memory() if adata.isbacked else adata.copy()) if copy else adata
    target.obsm[key_added] = out
    target.uns["cellfm"] = {
        "model": {"vocabulary": config.vocabulary, **{k: v for k, v in config.to_dict().items()
                                                       if isinstance(v, (int, float, str, bool))}},
        "key_added": key_added,
        "layer": layer or "X",
        "gene_key": gene_key or "var_names",
        "max_genes": max_genes,
        "seed": seed,
        "n_empty_cells": int(len(empty_cells)),
        **mapping.summary(),
        "n_dropped": int(len(mapping.token_ids) - mapping.n_matched),
    }
    return target if copy else None


def get_gene_embeddings(
    model: CellFM | str | Path,
    genes: list[str] | None = None,
    *,
    adata: ad.AnnData | None = None,
    varm_key: str = "cellfm_gene_emb",
    gene_key: str | None = None,
) -> pd.DataFrame:
    """Rows of the model's gene table as a DataFrame indexed by vocabulary gene symbol.

    `genes` (symbols, aliases or Ensembl ids) picks and orders rows; unknown genes raise. Without
    it, all vocabulary genes are returned. With `adata`, also writes `adata.varm[varm_key]`
    (n_vars, d_model) float32 for adata's genes mapped through the vocabulary, NaN where a gene
    does not match.
    """
    from cellfm.vocab import map_genes

    model = resolve_model(model)
    table = model.module.gene_emb.detach().float().cpu().numpy()  # (rows, D), row 0 = padding
    symbols = np.asarray(model.vocab.genes, dtype=object)
    columns = [f"dim_{i}" for i in range(table.shape[1])]
    if genes is None:
        ids = np.arange(1, len(symbols) + 1)
    else:
        unique = pd.unique(pd.Index([str(g) for g in genes]))  # map_genes drops repeats as duplicates
        found = dict(zip(unique, map_genes(unique, model.vocab, min_genes=0).token_ids, strict=True))
        ids = np.array([found[str(g)] for g in genes], dtype=np.int64)
        unknown = [g for g, i in zip(genes, ids, strict=True) if i <= 0]
        if unknown:
            raise KeyError(f"{len(unknown)} genes are not in vocabulary {model.vocab.name!r}: {unknown[:10]}")
    frame = pd.DataFrame(table[ids], index=pd.Index(symbols[ids - 1], name="gene"), columns=columns)
    if adata is not None:
        adata_ids = map_genes(gene_names(adata, gene_key), model.vocab, min_genes=0).token_ids
        emb = np.full((adata.n_vars, table.shape[1]), np.nan, dtype=np.float32)
        emb[adata_ids > 0] = table[adata_ids[adata_ids > 0]]
        adata.varm[varm_key] = emb
    return frame


def match_genes(names: pd.Index, model: CellFM):
    """map_genes onto the model's vocabulary, refusing mouse-case symbols (Cd3e) that would
    otherwise match human genes only by ignoring case."""
    from cellfm.vocab import map_genes

    mapping = map_genes(names, model.vocab)
    matched = mapping.how[mapping.token_ids > 0]
    if (matched == "case").mean() > 0.5:
        example = ", ".join(repr(g) for g in mapping.names[mapping.how == "case"][:5])
        raise ValueError(
            f"{(matched == 'case').sum()} of {len(matched)} matched genes match the human vocabulary "
            f"only when case is ignored (e.g. {example}): these look like mouse gene symbols. Map "
            "them to human orthologs first (or fix the case if the data are human)."
        )
    return mapping


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(enabled: bool, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="cellfm embed", unit="cell", disable=not enabled)

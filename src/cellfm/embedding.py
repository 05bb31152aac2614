"""Cell and gene embeddings from AnnData (scanpy convention: results go into documented keys).

`embed(adata, model)` checks the counts, maps the genes onto the model's vocabulary, tokenizes the
cells in row chunks (a backed AnnData is never densified), runs the encoder in batches of cells
with similar numbers of expressed genes and writes the CLS output to `adata.obsm["X_cellfm"]` in
the original row order. Nothing else in `adata` changes apart from `adata.uns["cellfm"]` (what
was matched). `adata` may also be a path (.h5ad, 10x folder or .h5, .loom): the file is read
with `cellfm.io.read_cells` and the new AnnData returned.

Error messages name Python arguments (`layer='counts'`); the CLI runs the same checks and they
name its flags instead (see `cellfm.wording`).

Cells with more than `max_genes` expressed genes (2048 for the official models) are subsampled
to `max_genes` genes with a fixed seed, so running `embed` twice gives the same embeddings.

`st_tokens=True` feeds the two ST tokens of the authors' fine-tuning model (`model/st_tokens.py`)
with each cell's library size (S = T = its total count over the matched genes, as at inference in
the official code); only models whose weights carry ST tokens accept it (`require_st_weights`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    import anndata as ad

    from cellfm.cellfm import CellFM
    from cellfm.vocab.gene_mapping import GeneMapping

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None / "auto" -> CUDA when available, else CPU; anything else is taken as given."""
    from cellfm.wording import arg

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        choices = f"{arg('device', 'cpu')}, {arg('device', 'cuda')} or {arg('device', 'auto')}"
        raise ValueError(f"{arg('device', str(device))} is not a device torch knows: use {choices}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{arg('device', str(device))} was asked for but torch sees no CUDA GPU (a CPU-only "
                         f"torch build?); use {arg('device', 'cpu')}")
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"{arg('device', str(device))} is not supported for embedding: use "
                         f"{arg('device', 'cpu')} or {arg('device', 'cuda')}")
    return dev


def resolve_model(model: CellFM | str | Path, device: torch.device | None = None) -> CellFM:
    from cellfm.cellfm import CellFM, load

    if isinstance(model, CellFM):
        return model
    return load(model, device=device)


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
    allow_non_integer: bool = False,
    st_tokens: bool = False,
) -> ad.AnnData | None:
    """Embed every cell of `adata` with a CellFM model.

    Parameters
    ----------
    adata
        Cells x genes with raw counts in `adata.X` (or `layer`); may be backed (`backed="r"`). Or a
        path to an .h5ad, a 10x matrix folder, a 10x .h5 or a .loom file: it is read and the new
        AnnData is returned.
    model
        A `CellFM`, a built-in model name (e.g. "cellfm-mini") or a model folder / checkpoint.
    batch_size
        Cells per forward pass (cells are grouped by number of expressed genes).
    device
        "cpu", "cuda" or "auto"/None (CUDA when available). CPU runs in float32, CUDA in bfloat16
        autocast.
    layer
        Take counts from `adata.layers[layer]` instead of `adata.X`; "raw" takes `adata.raw`
        (its own genes).
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
    allow_non_integer
        Accept non-negative counts that are not whole numbers (ambient-corrected counts from
        SoupX / CellBender). Log-transformed or CPM-like data are refused regardless.
    st_tokens
        Add the two ST tokens (the cell's total count) after CLS, as the authors' fine-tuning
        model does. Needs a model with ST-token weights (the official 80M release, or a model
        fine-tuned with `st_tokens=True`); other models raise a ValueError.

    Returns
    -------
    The new AnnData if `copy=True` or `adata` was a path, else None. Also writes
    `adata.uns["cellfm"]`: the model and the gene-matching summary.

    Examples
    --------
    >>> model = cellfm.load("cellfm-mini")
    >>> cellfm.embed(adata, model)
    >>> sc.pp.neighbors(adata, use_rep="X_cellfm")
    """
    from cellfm.tokenizer import iter_token_batches
    from cellfm.wording import arg

    if isinstance(adata, (str, Path)):
        from cellfm.io import read_cells

        loaded = read_cells(adata)
        embed(loaded, model, batch_size=batch_size, device=device, layer=layer, key_added=key_added,
              gene_key=gene_key, progress=progress, max_genes=max_genes, empty=empty, seed=seed,
              allow_non_integer=allow_non_integer, st_tokens=st_tokens)
        return loaded
    if empty not in ("raise", "zero"):
        raise ValueError(f"{arg('empty', empty)} is not a choice: use {arg('empty', 'raise')} or "
                         f"{arg('empty', 'zero')}")
    if batch_size < 1:
        raise ValueError(f"{arg('batch_size', batch_size)}: the batch size must be positive")
    dev = resolve_device(device)
    if adata.n_obs == 0:
        raise ValueError("the input has no cells (0 rows): nothing to embed")
    if layer == "raw":  # adata.raw has its own genes: embed it as an AnnData of its own
        if adata.raw is None:
            raise ValueError(f"{arg('layer', 'raw')} was asked for but the AnnData has no .raw")
        target = adata.to_memory() if (copy and adata.isbacked) else (adata.copy() if copy else adata)
        result = embed(adata.raw.to_adata(), model, batch_size=batch_size, device=dev, key_added=key_added,
                       gene_key=gene_key, copy=True, progress=progress, max_genes=max_genes, empty=empty,
                       seed=seed, allow_non_integer=allow_non_integer, st_tokens=st_tokens)
        target.obsm[key_added] = result.obsm[key_added]
        target.uns["cellfm"] = {**result.uns["cellfm"], "layer": "raw"}
        return target if copy else None
    model = resolve_model(model)
    if st_tokens:
        require_st_weights(model)
    plan = plan_embedding(adata, model, layer=layer, gene_key=gene_key, key_added=key_added,
                          max_genes=max_genes, empty=empty, seed=seed, allow_non_integer=allow_non_integer)
    plan.uns["st_tokens"] = bool(st_tokens)
    out = np.zeros((adata.n_obs, model.config.d_model), dtype=np.float32)
    done = np.zeros(adata.n_obs, dtype=bool)
    batches = iter_token_batches(adata, plan.mapping, batch_size=batch_size, max_genes=plan.max_genes,
                                 layer=layer, seed=seed)
    bar = _progress(progress, adata.n_obs - len(plan.empty_cells))
    try:
        with on_device(model, dev) as module:
            for batch in batches:
                rows, cls = embed_batch(module, batch, dev, st_tokens=st_tokens)
                out[rows] = cls
                done[rows] = True
                bar.update(len(rows))
    finally:
        bar.close()
    missing = np.flatnonzero(~done)
    if len(np.setdiff1d(missing, plan.empty_cells)):
        raise RuntimeError(f"internal error: {len(missing)} cells were not embedded")

    # a backed AnnData cannot be copied without a new file: copy=True loads it into memory
    target = (adata.to_memory() if adata.isbacked else adata.copy()) if copy else adata
    target.obsm[key_added] = out
    target.uns["cellfm"] = plan.uns
    return target if copy else None


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
                   allow_non_integer: bool, matrix=None) -> EmbeddingPlan:
    """Check the counts and match the genes (reading `adata` in row chunks); raise on bad input.
    `matrix`: the counts when `adata` holds only obs and var (`cellfm.io.open_rows`)."""
    from cellfm.tokenizer import check_counts, count_matrix
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
    with warnings.catch_warnings():  # empty cells are handled below, by `empty`
        warnings.filterwarnings("ignore", message=r".* cells have no counts")
        counts = count_matrix(adata, layer) if matrix is None else matrix
        check_counts(counts, allow_non_integer=allow_non_integer, where=where, fix=fix)

    columns = np.flatnonzero(mapping.token_ids > 0)
    n_expressed = expressed_matched_genes(adata, columns, layer, matrix=matrix)
    empty_cells = np.flatnonzero(n_expressed == 0)
    if len(empty_cells) and empty == "raise":
        filt = "" if in_cli() else ", e.g. `sc.pp.filter_cells(adata, min_genes=1)` on the matched genes,"
        raise ValueError(
            f"{len(empty_cells)} of {adata.n_obs} cells express none of the {len(columns)} matched "
            f"genes (first: {list(adata.obs_names[empty_cells[:3]])}); filter them out first{filt} "
            f"or pass {arg('empty', 'zero')} to give them a zero embedding"
        )

    uns = {
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
    return EmbeddingPlan(mapping, max_genes, empty_cells, uns)


@contextmanager
def on_device(model: CellFM, dev: torch.device) -> Iterator[torch.nn.Module]:
    """The model's module in eval mode on `dev`; its mode and device are restored afterwards."""
    module = model.module
    was_training, old_device = module.training, model.device
    module.eval().to(dev)
    try:
        yield module
    finally:
        module.train(was_training).to(old_device)


def embed_batch(module: torch.nn.Module, batch, dev: torch.device, st_tokens: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """(rows, CLS embeddings (B, D) float32) of one CellBatch; bf16 autocast on CUDA. With
    `st_tokens`, the ST tokens carry each cell's total (S = T = `batch.totals`)."""
    from cellfm.model.st_tokens import st_features

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else _null()
    with torch.inference_mode(), autocast:
        batch = batch.to(dev, non_blocking=True)
        st_feat = st_features(batch.totals) if st_tokens else None  # (B, 2)
        cls = module.cell_embedding(batch.gene_ids, batch.values, batch.token_mask, st_feat=st_feat)  # (B, D)
        return batch.cell_index.cpu().numpy(), cls.float().cpu().numpy()


def require_st_weights(model: CellFM) -> None:
    """Refuse `st_tokens=True` for a model without ST-token weights: new random ones would make
    the embedding noise, not a library-size signal."""
    from cellfm.wording import arg

    if not model.config.st_tokens:
        raise ValueError(
            f"{arg('st_tokens', True)} needs a model with ST-token weights and this one has none; "
            "the official 80M release (cellfm-80m, CellFM_80M_weight.ckpt: ST_emb, ST_enc) and "
            "models fine-tuned for integration with ST tokens carry them. Leave out "
            f"{arg('st_tokens', True)} for this model"
        )


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


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(enabled: bool, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="cellfm embed", unit="cell", disable=not enabled)

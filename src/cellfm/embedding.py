"""Cell and gene embeddings from AnnData (scanpy convention: results go into documented keys).

`embed(adata, model)` checks the counts, maps the genes onto the model's vocabulary, tokenizes the
cells in row chunks (a backed AnnData is never densified), runs the encoder in batches of cells
with similar numbers of expressed genes and writes the CLS output to `adata.obsm["X_cellfm"]` in
the original row order. Nothing else in `adata` changes apart from `adata.uns["cellfm"]` (what
was matched). `adata` may also be a path (.h5ad, 10x folder or .h5, .loom): the file is read
with `cellfm.io.read_cells` and the new AnnData returned. The checks and the gene matching live
in `cellfm.embedding_plan`; streaming a file to disk (resumable, under torchrun) in
`cellfm.embedding_store`.

Error messages name Python arguments (`layer='counts'`); the CLI runs the same checks and they
name its flags instead (see `cellfm.wording`).

Cells with more than `max_genes` expressed genes (2048 for the official models) are subsampled
to `max_genes` genes with a fixed seed, so running `embed` twice gives the same embeddings.

`st_tokens=True` feeds the two ST tokens of the authors' fine-tuning model (`model/st_tokens.py`)
with each cell's library size (S = T = its total count over the matched genes, as at inference in
the official code); only models whose weights carry ST tokens accept it (`require_st_weights`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    import anndata as ad

    from cellfm.cellfm import CellFM


def default_batch_size(device: torch.device) -> int:
    """Cells per forward pass when none is given: 16 on CPU, where small batches stay in cache and
    carry less padding (cellfm-mini, 1 thread: 118 vs 103 cells/s at 64; two processes scale 1.96x
    instead of 1.72x, benchmarks/embed_scaling.py), 64 on a GPU."""
    return 16 if device.type == "cpu" else 64


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


def embed(
    adata: ad.AnnData,
    model: CellFM | str | Path,
    *,
    batch_size: int | None = None,
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
        Cells per forward pass (cells are grouped by number of expressed genes); None: 16 on
        CPU, 64 on a GPU (`default_batch_size`).
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
    from cellfm.embedding_plan import plan_embedding
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
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"{arg('batch_size', batch_size)}: the batch size must be positive")
    dev = resolve_device(device)
    batch_size = batch_size or default_batch_size(dev)
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
    from cellfm.embedding_plan import gene_names
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


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(enabled: bool, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="cellfm embed", unit="cell", disable=not enabled)

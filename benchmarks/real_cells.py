"""Real cells for the benchmarks: where the data is (`--data` or CELLFM_DATA_DIR, never a path
guessed from the source tree), cells as (gene ids, values) arrays, padded and packed batches, and
the batch size `cellfm.embed` would use."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

PBMC = "pbmc4k_soupx/pbmc4k_soupx_half.h5ad"


def data_dir(given: str | None = None) -> Path:
    """The shared data folder: `given`, else $CELLFM_DATA_DIR; exits with the fix when neither is set."""
    path = given or os.environ.get("CELLFM_DATA_DIR")
    if not path:
        raise SystemExit("no data folder: pass --data-dir DIR (the shared data folder, holding "
                         f"{PBMC}) or set CELLFM_DATA_DIR")
    if not Path(path).is_dir():
        raise SystemExit(f"data folder {path} does not exist (--data-dir or CELLFM_DATA_DIR)")
    return Path(path)


def pbmc_file(data: str | None, data_dir_arg: str | None) -> Path:
    """`--data FILE` if given, else the PBMC file in the data folder."""
    return Path(data) if data else data_dir(data_dir_arg) / PBMC


def embed_batch_size(device: str = "cpu") -> tuple[int, str]:
    """The cells per forward pass `cellfm.embed` uses on `device` and where the number came from."""
    try:
        from cellfm.embedding import default_batch_size
    except ImportError:  # the package moved it: say so rather than guess silently
        return 16, "16 (cellfm.embedding.default_batch_size not importable; the CPU value of issue 18)"
    return default_batch_size(torch.device(device)), "cellfm.embedding.default_batch_size"


def load_cells(path: Path, n_cells: int, max_genes: int, n_vocab: int, seed: int = 0):
    """Real cells as (gene ids, log-normalised values) arrays per cell, sampled to max_genes.

    Gene ids are a fixed random map of the file's genes into the vocabulary: speed depends on
    the number of expressed genes per cell, not on which genes they are.
    """
    import anndata as ad

    adata = ad.read_h5ad(path)
    X = adata.X[:n_cells].tocsr()
    rng = np.random.default_rng(seed)
    gene_map = rng.integers(1, n_vocab + 1, X.shape[1])
    cells = []
    for i in range(X.shape[0]):
        a, b = X.indptr[i], X.indptr[i + 1]
        idx, cnt = X.indices[a:b], X.data[a:b].astype(np.float32)
        vals = np.log1p(cnt / cnt.sum() * 1e4)
        if len(idx) > max_genes:
            keep = rng.choice(len(idx), max_genes, replace=False)
            idx, vals = idx[keep], vals[keep]
        cells.append((gene_map[idx], vals))
    return cells


def make_batches(cells, batch_size: int):
    """Sort by length (as `cellfm.embed` does within a chunk), pad right: (gene_ids, values,
    token_mask) per batch."""
    order = np.argsort([len(c[0]) for c in cells], kind="stable")
    batches = []
    for s in range(0, len(order), batch_size):
        group = [cells[i] for i in order[s : s + batch_size]]
        L = max(len(g[0]) for g in group)
        ids = torch.zeros(len(group), L, dtype=torch.long)
        vals = torch.zeros(len(group), L)
        mask = torch.zeros(len(group), L, dtype=torch.bool)
        for b, (gi, gv) in enumerate(group):
            ids[b, : len(gi)] = torch.from_numpy(gi)
            vals[b, : len(gv)] = torch.from_numpy(gv)
            mask[b, : len(gi)] = True
        batches.append((ids, vals, mask))
    return batches


def make_packs(cells, max_tokens: int | None):
    """Packed batches (`PackedBatch`) of the cells sorted by length, at most `max_tokens` tokens
    each (CLS included; None: all cells in one pack)."""
    from cellfm.tokenizer.packing import pack_cells, token_budget_groups

    order = np.argsort([len(c[0]) for c in cells], kind="stable")
    lengths = [len(cells[i][0]) for i in order]
    budget = max_tokens or sum(lengths) + len(lengths)
    return [pack_cells([torch.from_numpy(cells[order[i]][0]) for i in g],
                       [torch.from_numpy(cells[order[i]][1]) for i in g])
            for g in token_budget_groups(lengths, budget)]

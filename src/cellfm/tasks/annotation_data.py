"""Reference preparation for the cell type annotator: label checks, the stratified validation
split, gene matching, tokenized batches and the trainable copy of the encoder (LoRA / full).
Nothing here trains or predicts."""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cellfm.tasks.benchmark_data import UNLABELLED

if TYPE_CHECKING:
    import anndata as ad

    from cellfm.cellfm import CellFM


def checked_labels(adata: ad.AnnData, label_key: str, min_cells: int) -> pd.Series:
    """Labels as strings, NaN where unlabelled or in a class too small to learn."""
    if label_key not in adata.obs.columns:
        raise KeyError(
            f"label column {label_key!r} is not in adata.obs (columns: {list(adata.obs.columns)}); "
            "pass --label-key / label_key= with the column holding cell types"
        )
    labels = adata.obs[label_key].astype(object)
    labels = labels.where(labels.notna() & ~labels.astype(str).isin(UNLABELLED))
    counts = labels.value_counts()
    small = counts[counts < min_cells]
    if len(small):
        warnings.warn(
            f"dropping {len(small)} classes with fewer than {min_cells} cells: "
            f"{dict(small)} (lower min_cells_per_class to keep them)",
            stacklevel=3,
        )
        labels = labels.where(~labels.isin(small.index))
    n = labels.nunique()
    if n < 2:
        raise ValueError(
            f"obs[{label_key!r}] has {n} class(es) with at least {min_cells} cells; "
            "annotation needs at least 2"
        )
    return labels.astype(object)


def stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    n_cls = int(y.max()) + 1
    n_val = max(n_cls, int(round(val_fraction * len(y))))
    tr, va = train_test_split(np.arange(len(y)), test_size=n_val, stratify=y, random_state=seed)
    return np.sort(tr), np.sort(va)


def matched_genes(adata: ad.AnnData, model: CellFM) -> list[str]:
    from cellfm.vocab import map_genes

    names = pd.Index(adata.var_names.astype(str))
    ids = np.asarray(map_genes(names, model.vocab).token_ids)
    genes = [model.vocab.genes[i - 1] for i in ids if i > 0]
    if not genes:
        raise ValueError(
            f"none of the {len(names)} genes (e.g. {list(names[:5])}) matches the model "
            f"vocabulary {model.vocab.name!r}; use human gene symbols or Ensembl ids"
        )
    return sorted(set(genes))


def token_batches(adata: ad.AnnData, model: CellFM, batch_size: int, seed: int) -> list:
    """Tokenize once; cell_index of each batch = row in `adata`."""
    from cellfm.tokenizer import iter_token_batches
    from cellfm.vocab import map_genes

    mapping = map_genes(pd.Index(adata.var_names.astype(str)), model.vocab)
    return list(
        iter_token_batches(adata, mapping, batch_size=batch_size, max_genes=model.config.max_genes, seed=seed)
    )


def trainable_copy(base: CellFM, mode: str, lora_rank: int) -> CellFM:
    """A copy of the encoder with the parameters of `mode` trainable (the base model is untouched)."""
    from cellfm.cellfm import CellFM
    from cellfm.model import CellFMModule

    if mode == "full":
        module = copy.deepcopy(base.module)
        for p in module.parameters():
            p.requires_grad_(True)
        return CellFM(base.config, module, base.vocab)
    if lora_rank < 1:
        raise ValueError(f"mode='lora' needs lora_rank >= 1, got {lora_rank}")
    config = base.config.replace(lora_rank=lora_rank)
    module = CellFMModule(config)
    missing, unexpected = module.load_state_dict(base.module.state_dict(), strict=False)
    bad = [k for k in missing if "lora_" not in k] + list(unexpected)
    if bad:
        raise ValueError(f"base weights do not fit the LoRA model: {bad[:5]}")
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    return CellFM(config, module, base.vocab)

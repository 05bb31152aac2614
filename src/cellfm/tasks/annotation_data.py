"""Reference preparation for the cell type annotator: label checks, the stratified validation
split, gene matching, tokenized batches, the encoder with ST tokens and the trainable copy of the
encoder (LoRA / full). Nothing here trains or predicts."""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cellfm.contract.labels import UNLABELLED

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
    """Tokenize once, through the input contract; cell_index of each batch = row in `adata`."""
    from cellfm.contract.setup import setup_cells

    return list(setup_cells(adata, model, seed=seed, empty="zero").batches(batch_size))


def refuse_frozen_without_st(model: CellFM, mode: str) -> None:
    """ST tokens with a frozen encoder need trained ST weights: new random ones would only add
    noise that nothing learns to use."""
    from cellfm.wording import arg

    if mode == "frozen" and not model.config.st_tokens:
        raise ValueError(
            f"{arg('st_tokens', True)} with {arg('mode', 'frozen')} needs a model with ST-token weights "
            "and this one has none (the official 80M release, cellfm-80m, carries them); use "
            f"{arg('mode', 'lora')} or {arg('mode', 'full')} to create and train new ones, or leave out "
            f"{arg('st_tokens', True)}"
        )


def st_encoder(base: CellFM, mode: str) -> tuple[CellFM, str]:
    """(encoder with ST tokens, where its ST weights come from: "checkpoint" or "new"). A model
    without them gets new ones (official init) in lora / full mode, with a warning; they train
    with the encoder."""
    from cellfm.wording import arg

    refuse_frozen_without_st(base, mode)
    if base.config.st_tokens:
        return base, "checkpoint"
    warnings.warn(
        f"{arg('st_tokens', True)}: the model has no ST-token weights, so new ones were created "
        f"(official init); they are trained with the encoder ({arg('mode', mode)})",
        stacklevel=3,
    )
    return base.with_st_tokens(), "new"


def trainable_copy(base: CellFM, mode: str, lora_rank: int, train_st: bool = False) -> CellFM:
    """A copy of the encoder with the parameters of `mode` trainable (the base model is untouched);
    `train_st`: the ST tokens train too (in "full" mode everything does)."""
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
        p.requires_grad_("lora_" in name or (train_st and name.startswith("st.")))
    return CellFM(config, module, base.vocab)

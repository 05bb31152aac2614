"""Reference preparation for the cell type annotator: label checks, the stratified validation
split, tokenized batches, the encoder with ST tokens and the trainable copy of the encoder
(LoRA / full). Cells are read only through `cellfm.contract.setup_cells`. Nothing here trains or
predicts."""

from __future__ import annotations

import copy
import warnings

import anndata as ad
import numpy as np
import pandas as pd

from cellfm.batch import CellBatch
from cellfm.cellfm import CellFM
from cellfm.contract.labels import is_unlabelled
from cellfm.contract.setup import setup_cells
from cellfm.model import CellFMModule
from cellfm.wording import arg


def checked_labels(adata: ad.AnnData, label_key: str, min_cells: int) -> pd.Series:
    """Labels as strings, NaN where unlabelled or in a class too small to learn."""
    if label_key not in adata.obs.columns:
        raise KeyError(
            f"label column {label_key!r} is not in adata.obs (columns: {list(adata.obs.columns)}); "
            "pass --label-key / label_key= with the column holding cell types"
        )
    labels = adata.obs[label_key].astype(object)
    labels = labels.where(~is_unlabelled(labels))
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


def validation_split(
    y: np.ndarray, val_fraction: float, min_val_cells: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows), stratified by class. The validation set holds
    `val_fraction` of the cells but at least `min_val_cells` (and one per class), never more than
    a third: too few held-out cells make the validation loss jump from epoch to epoch and early
    stopping acts on that noise."""
    from sklearn.model_selection import train_test_split

    n_cls = int(y.max()) + 1
    n_val = max(n_cls, int(round(val_fraction * len(y))), min(min_val_cells, len(y) // 3))
    tr, va = train_test_split(np.arange(len(y)), test_size=n_val, stratify=y, random_state=seed)
    return np.sort(tr), np.sort(va)


def token_batches(adata: ad.AnnData, model: CellFM, batch_size: int, seed: int, **read) -> list[CellBatch]:
    """Tokenize once, through the input contract (`read`: layer / use_raw / gene_key); the
    `cell_index` of each batch is the row in `adata`."""
    return list(setup_cells(adata, model, seed=seed, empty="zero", **read).batches(batch_size))


def refuse_frozen_without_st(model: CellFM, mode: str) -> None:
    """ST tokens with a frozen encoder need trained ST weights: new random ones would only add
    noise that nothing learns to use."""
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

"""Held-out masked-value error: the model's gene-wise decoder vs a per-gene-mean baseline.

Both are scored on the same positions: the pretraining loss positions (`loss_mask`) of the
held-out cells, drawn from the corpus with a fixed seed/epoch so every evaluation sees the same
masks. The baseline predicts each masked gene by its mean log-normalised value over the training
cells that express it (the model also knows which genes are expressed, so this is the fair
per-gene mean; genes never seen in training get the global mean).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from cellfm.corpus import CorpusDataset
from cellfm.distributed import all_reduce_sum


def held_out_dataset(corpus_dir: str | Path, *, batch_size: int, val_fraction: float, max_genes: int,
                     rank: int = 0, world_size: int = 1, seed: int = 0) -> CorpusDataset:
    return CorpusDataset(corpus_dir, seed=seed, epoch=0, rank=rank, world_size=world_size,
                         batch_size=batch_size, max_genes=max_genes, split="val", val_fraction=val_fraction)


@torch.no_grad()
def masked_value_mse(module: nn.Module, dataset: CorpusDataset, *, max_batches: int = 0,
                     device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None
                     ) -> dict[str, float]:
    """Mean squared error of gene_pred and cell_pred at the held-out loss positions (all ranks)."""
    was_training = module.training
    module.eval()
    dev = torch.device(device)
    sums = torch.zeros(3, dtype=torch.float64, device=dev)  # gene sq err, cell sq err, count
    for i, batch in enumerate(dataset):
        if max_batches and i >= max_batches:
            break
        batch = batch.to(dev) if hasattr(batch, "to") else batch
        with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = module(batch.gene_ids, batch.values, batch.token_mask, batch.hidden_mask)
        m = batch.loss_mask & batch.token_mask
        v = batch.values[m].double()
        sums[0] += ((out.gene_pred.double()[m] - v) ** 2).sum()
        sums[1] += ((out.cell_pred.double()[m] - v) ** 2).sum()
        sums[2] += m.sum()
    all_reduce_sum(sums)
    module.train(was_training)
    n = max(float(sums[2]), 1.0)
    return {"val_gene_mse": float(sums[0]) / n, "val_cell_mse": float(sums[1]) / n,
            "val_positions": int(sums[2])}


def per_gene_means(corpus_dir: str | Path, *, val_fraction: float, n_rows: int, max_genes: int = 2048,
                   batch_size: int = 256) -> np.ndarray:
    """(n_rows,) mean log-normalised value of each gene id over the training cells expressing it."""
    ds = CorpusDataset(corpus_dir, seed=0, epoch=0, batch_size=batch_size, max_genes=max_genes,
                       split="train", val_fraction=val_fraction, mask=False)
    total = np.zeros(n_rows)
    count = np.zeros(n_rows)
    for batch in ds:
        ids = batch.gene_ids[batch.token_mask].numpy()
        vals = batch.values[batch.token_mask].numpy().astype(np.float64)
        total += np.bincount(ids, weights=vals, minlength=n_rows)
        count += np.bincount(ids, minlength=n_rows)
    glob = total.sum() / max(count.sum(), 1.0)
    return np.where(count > 0, total / np.maximum(count, 1), glob)


def per_gene_mean_mse(means: np.ndarray, dataset: CorpusDataset, max_batches: int = 0) -> dict[str, float]:
    """MSE of predicting each held-out masked value by `means[gene]` (same positions as the model)."""
    err, n = 0.0, 0
    for i, batch in enumerate(dataset):
        if max_batches and i >= max_batches:
            break
        m = (batch.loss_mask & batch.token_mask).numpy()
        ids = batch.gene_ids.numpy()[m]
        v = batch.values.numpy()[m].astype(np.float64)
        err += float(((means[ids] - v) ** 2).sum())
        n += int(m.sum())
    return {"baseline_mse": err / max(n, 1), "val_positions": n}

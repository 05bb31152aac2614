"""Cell identity of frozen CLS embeddings: kNN and linear-probe accuracy on labelled real cells,
next to PCA of HVG log counts (scanpy when installed) and an untrained model of the same shape.

The question this answers is whether pretraining put cell identity into the CLS at all, before any
annotation head is trained; `benchmarks/cell_identity.py`, the `cellfm evaluate` report and the
`cellfm-mini` model card use it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cellfm.embedding.memory import as_model as resolve_model
from cellfm.evaluation.baselines import HvgPca
from cellfm.evaluation.data import BENCHMARKS, benchmark_path
from cellfm.model import CellFMModule
from cellfm.training.probe import cls_embeddings, load_probe_set, probe_accuracy

IDENTITY_SETS = ("pbmc3k", "pbmc4k", "pbmc68k")  # names in `data.BENCHMARKS`
CELLFM, RANDOM, PCA = "CellFM CLS", "random init CLS", "PCA of HVG log counts"


def hvg_pca(path: Path, rows: np.ndarray) -> tuple[np.ndarray, str]:
    """PCA of HVG log counts as the field computes it (`baselines.HvgPca`: scanpy's HVGs, scale,
    50 PCs when scanpy is installed, a labelled stand-in otherwise) -> (embedding, backend)."""
    import anndata as ad

    hp = HvgPca()
    emb = hp.fit_transform(ad.read_h5ad(path)[rows].X)
    return np.asarray(emb, np.float32), hp.backend_


def evaluate_cell_identity(model, data_dir: str | Path | None = None, *, seeds: tuple[int, ...] = (0, 1, 2),
                           max_cells: int = 1500, sets: tuple[str, ...] = IDENTITY_SETS,
                           progress: bool = False) -> pd.DataFrame:
    """One row per (data set, embedding): mean and sd over `seeds` of 5-fold 15-NN accuracy
    (Euclidean on the raw embedding) and logistic-regression accuracy (standardised features).
    `data_dir`: the evaluation data folder (None: CELLFM_DATA_DIR)."""

    model = resolve_model(model)
    torch.manual_seed(0)
    random_init = CellFMModule(model.config)
    rows = []
    for name in sets:
        path, key = benchmark_path(name, data_dir), BENCHMARKS[name].label_key
        probe = load_probe_set(path, key, model.config, max_cells=max_cells)
        pca, backend = hvg_pca(path, probe.rows)
        embs = {CELLFM: cls_embeddings(model.module, probe), RANDOM: cls_embeddings(random_init, probe),
                PCA: pca}
        for emb_name, emb in embs.items():
            res = [probe_accuracy(emb, probe.labels, seed=s) for s in seeds]
            knn = np.array([r["knn_acc"] for r in res])
            lin = np.array([r["linear_acc"] for r in res])
            rows.append({"dataset": name, "cells": len(probe.labels), "types": len(probe.classes),
                         "embedding": emb_name, "pca_backend": backend, "knn_acc": knn.mean(),
                         "knn_sd": knn.std(), "linear_acc": lin.mean(), "linear_sd": lin.std()})
        if progress:
            print(f"cell identity: {name} done", flush=True)
    return pd.DataFrame(rows)


def identity_markdown(table: pd.DataFrame) -> str:
    """The table as Markdown, with which PCA ran."""
    lines = [f"PCA backend: {table['pca_backend'].iloc[0]}.", "",
             "| data | embedding | 15-NN accuracy | linear-probe accuracy |", "|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.dataset} ({r.cells} cells, {r.types} types) | {r.embedding} | "
                     f"{r.knn_acc:.3f} +- {r.knn_sd:.3f} | {r.linear_acc:.3f} +- {r.linear_sd:.3f} |")
    return "\n".join(lines)


def identity_targets(table: pd.DataFrame) -> list[str]:
    """The bars a useful CLS has to clear, met or missed: kNN >= PCA - 0.05 and >= random + 0.20;
    linear >= 0.90 on pbmc3k."""
    def met(ok: bool) -> str:
        return "met" if ok else "missed"

    out = []
    for name, t in table.groupby("dataset", sort=False):
        acc = t.set_index("embedding")
        knn, lin = acc.loc[CELLFM, "knn_acc"], acc.loc[CELLFM, "linear_acc"]
        pca, rnd = acc.loc[PCA, "knn_acc"], acc.loc[RANDOM, "knn_acc"]
        line = (f"{name}: kNN {knn:.3f} vs PCA-0.05 {pca - 0.05:.3f} ({met(knn >= pca - 0.05)}), "
                f"vs random+0.20 {rnd + 0.20:.3f} ({met(knn >= rnd + 0.20)})")
        if name == "pbmc3k":
            line += f"; linear {lin:.3f} vs 0.90 ({met(lin >= 0.90)})"
        out.append(line)
    return out


__all__ = ["IDENTITY_SETS", "evaluate_cell_identity", "hvg_pca", "identity_markdown", "identity_targets"]

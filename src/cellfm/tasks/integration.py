"""Batch integration: how well an embedding mixes batches while keeping cell types apart.

The benchmark combines three real PBMC data sets (batch = data set: 10x PBMC 4k, Seurat pbmc3k,
the celltypist sample) on their common genes, with their different label vocabularies harmonised
to coarse types through the explicit table `COARSE_TYPES` (the celltypist sample is unlabelled and
counts for batch mixing only). The CellFM embedding (zero-shot) is scored with
`integration_metrics.integration_scores` next to HVG+PCA of the same cells, and scVI/Harmony when
those packages happen to be installed (they are never required).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cellfm.tasks.integration_metrics import integration_scores

if TYPE_CHECKING:
    import anndata as ad

    from cellfm.cellfm import CellFM

log = logging.getLogger(__name__)

# data-set label -> coarse type shared by all data sets (None = not a usable label)
COARSE_TYPES: dict[str, str | None] = {
    # pbmc4k (SoupX annotation)
    "T_CD4": "CD4 T",
    "T_CD8": "CD8 T",
    "B": "B",
    "NK": "NK",
    "MNP": "Myeloid",
    "?": None,
    # pbmc3k (Seurat tutorial)
    "Naive CD4 T": "CD4 T",
    "Memory CD4 T": "CD4 T",
    "CD8 T": "CD8 T",
    "CD14+ Mono": "Myeloid",
    "FCGR3A+ Mono": "Myeloid",
    "DC": "Myeloid",
    "Platelet": "Platelet",
    # pbmc68k_reduced (bulk labels)
    "CD4+/CD25 T Reg": "CD4 T",
    "CD4+/CD45RA+/CD25- Naive T": "CD4 T",
    "CD4+/CD45RO+ Memory": "CD4 T",
    "CD8+ Cytotoxic T": "CD8 T",
    "CD8+/CD45RA+ Naive Cytotoxic": "CD8 T",
    "CD14+ Monocyte": "Myeloid",
    "Dendritic": "Myeloid",
    "CD19+ B": "B",
    "CD56+ NK": "NK",
    "CD34+": None,
}


def coarse_labels(labels: pd.Series) -> pd.Series:
    """Map data-set labels to `COARSE_TYPES`; unknown labels become NaN (and are logged)."""
    s = labels.astype(str)
    unmapped = sorted(set(s) - set(COARSE_TYPES) - {"nan"})
    if unmapped:
        log.warning("labels without a coarse type (left unlabelled): %s", unmapped)
    return s.map(lambda x: COARSE_TYPES.get(x)).astype(object)


def build_pbmc_batches(
    data_dir: str | Path | None = None,
    datasets: tuple[str, ...] = ("pbmc4k", "pbmc3k", "celltypist"),
    max_cells_per_batch: int | None = None,
    seed: int = 0,
) -> ad.AnnData:
    """Concatenate the PBMC data sets on common genes; obs["batch"] = data set, obs["coarse_type"]."""
    import anndata as ad

    from cellfm.tasks.benchmark_data import BENCHMARKS, load_benchmark

    parts = {}
    rng = np.random.default_rng(seed)
    for name in datasets:
        a = load_benchmark(name, data_dir, drop_unlabelled=False)
        if max_cells_per_batch is not None and a.n_obs > max_cells_per_batch:
            a = a[np.sort(rng.choice(a.n_obs, max_cells_per_batch, replace=False))].copy()
        key = BENCHMARKS[name].label_key
        a.obs = pd.DataFrame(
            {"batch": name, "label": a.obs[key].astype(str).to_numpy() if key else "nan"},
            index=a.obs_names.astype(str) + f"-{name}",
        )
        a.obs["coarse_type"] = coarse_labels(a.obs["label"]).to_numpy()
        a.var = pd.DataFrame(index=a.var_names.astype(str))
        parts[name] = a
    common = sorted(set.intersection(*(set(a.var_names) for a in parts.values())))
    if len(common) < 50:
        raise ValueError(f"the data sets share only {len(common)} genes")
    out = ad.concat([a[:, common] for a in parts.values()], join="inner")
    out.obs["batch"] = pd.Categorical(out.obs["batch"])
    return out


def evaluate_integration(
    adata: ad.AnnData,
    model: CellFM,
    *,
    batch_key: str = "batch",
    label_key: str | None = "coarse_type",
    seed: int = 0,
    progress: bool = True,
    device: str | None = "cpu",
    finetune_epochs: int = 0,
) -> dict:
    """Scores of the CellFM embedding and the baselines on `adata` (raw counts).

    Writes obsm["X_cellfm"] and obsm["X_pca"] into `adata` (for plots). With `finetune_epochs` > 0
    the encoder is also fine-tuned on these cells first (`integration_finetune`, self-supervised:
    no labels or batches are used) and scored as a further row (obsm["X_cellfm_finetuned"]).
    Returns {"table": DataFrame (one row per method), "embeddings": {method: array}}.
    """
    from cellfm.embedding import embed
    from cellfm.tasks.baselines import HvgPca

    for key in (batch_key, label_key):
        if key is not None and key not in adata.obs.columns:
            raise KeyError(f"obs has no column {key!r} (columns: {list(adata.obs.columns)})")
    embed(adata, model, device=device, progress=progress, empty="zero")
    adata.obsm["X_pca"] = HvgPca(seed=seed).fit_transform(adata.X)
    embeddings = {"CellFM (zero-shot)": adata.obsm["X_cellfm"], "HVG+PCA": adata.obsm["X_pca"]}
    if finetune_epochs > 0:
        from cellfm.tasks.integration_finetune import fine_tune_for_integration

        tuned = fine_tune_for_integration(
            adata, model, epochs=finetune_epochs, device=device, seed=seed, progress=progress
        )
        embed(adata, tuned, device=device, progress=progress, empty="zero", key_added="X_cellfm_finetuned")
        embeddings[f"CellFM (fine-tuned, {finetune_epochs} ep)"] = adata.obsm["X_cellfm_finetuned"]
    embeddings.update(_optional_integrations(adata, batch_key))
    batches = adata.obs[batch_key].astype(str).to_numpy()
    labels = adata.obs[label_key].to_numpy() if label_key else None
    rows = [{"method": m, **integration_scores(e, batches, labels, seed)} for m, e in embeddings.items()]
    return {"table": pd.DataFrame(rows), "embeddings": embeddings}


def _optional_integrations(adata: ad.AnnData, batch_key: str) -> dict[str, np.ndarray]:
    """Harmony on the PCA when harmonypy is importable; nothing otherwise (no installs here)."""
    out = {}
    try:
        import harmonypy
    except ImportError:
        return out
    try:
        ho = harmonypy.run_harmony(adata.obsm["X_pca"], adata.obs, batch_key, verbose=False)
        out["Harmony (PCA)"] = np.asarray(ho.Z_corr).T.astype(np.float32)
    except Exception as err:  # an optional extra must never break the evaluation
        log.warning("harmony failed: %s", err)
    return out

"""Batch integration: how well an embedding mixes batches while keeping cell types apart.

The benchmark combines three real PBMC data sets (batch = data set: 10x PBMC 4k, Seurat pbmc3k,
the celltypist sample) on their common genes, with their different label vocabularies harmonised
to coarse types through the explicit table `COARSE_TYPES` (the celltypist sample is unlabelled:
it is embedded and corrected with the others but left out of the scores, which need a label per
cell). The CellFM embedding (zero-shot, and optionally fine-tuned) is scored by scib-metrics
(`integration_metrics`) next to HVG+PCA, Harmony and scVI of the same cells
(`integration_baselines`); every optional package is reported as run or not run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

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
    label_key: str = "coarse_type",
    seed: int = 0,
    progress: bool = True,
    device: str | None = "cpu",
    finetune_epochs: int = 0,
    st_tokens: bool = True,
    harmony: bool = True,
    scvi_epochs: int = 20,
    scorer: str = "auto",
) -> dict:
    """Scores of the CellFM embedding and the baselines on `adata` (raw counts).

    Writes obsm["X_cellfm"], obsm["X_pca"] (and "X_harmony", "X_scVI" when those ran) into `adata`
    for plots. With `finetune_epochs` > 0 the encoder is also fine-tuned on these cells first
    (`integration_finetune`, self-supervised: no labels or batches are used) and scored as a further
    row (obsm["X_cellfm_finetuned"]); `st_tokens` fine-tunes the authors' ST-token model, as their
    integration tutorial does. `scorer` is passed to `integration_metrics.score_embeddings`.
    Returns {"table": DataFrame (one row per method), "embeddings": {method: array},
    "scorer": str, "methods": {method: what ran or why not}, "n_scored": int}.
    """
    from cellfm.embedding.memory import embed
    from cellfm.tasks.integration_baselines import integration_baselines
    from cellfm.tasks.integration_metrics import score_embeddings, scoring_frame

    batches, labels = scoring_frame(adata, batch_key, label_key)
    embed(adata, model, device=device, progress=progress, empty="zero")
    embeddings = {"CellFM (zero-shot)": adata.obsm["X_cellfm"]}
    methods = {"CellFM (zero-shot)": "CLS embedding of the model as loaded"}
    if finetune_epochs > 0:
        from cellfm.tasks.integration_finetune import fine_tune_for_integration

        tuned = fine_tune_for_integration(
            adata, model, epochs=finetune_epochs, st_tokens=st_tokens, device=device, seed=seed,
            progress=progress,
        )
        embed(adata, tuned, device=device, progress=progress, empty="zero", key_added="X_cellfm_finetuned")
        name = f"CellFM (fine-tuned, {finetune_epochs} ep)"
        embeddings[name] = adata.obsm["X_cellfm_finetuned"]
        methods[name] = ("self-supervised integration fine-tuning on these cells"
                         + (", the authors' ST-token model" if st_tokens else ", CLS only"))
    base = integration_baselines(
        adata, batch_key, harmony=harmony, scvi_epochs=scvi_epochs, seed=seed, progress=progress
    )
    for name, key in (("HVG+PCA", "X_pca"), ("Harmony", "X_harmony"), ("scVI", "X_scVI")):
        if name in base.embeddings:
            adata.obsm[key] = base.embeddings[name]
    embeddings.update(base.embeddings)
    methods.update(base.notes)
    scores = score_embeddings(
        embeddings, batches, labels, unintegrated="HVG+PCA", scorer=scorer, seed=seed, progress=progress
    )
    return {
        "table": scores.table,
        "embeddings": embeddings,
        "scorer": scores.scorer,
        "methods": methods,
        "n_scored": scores.n_cells,
    }


def describe_run(result: dict) -> str:
    """One line per method saying what ran (or why not), and which scorer made the numbers."""
    lines = [f"scores: {result['scorer']} on {result['n_scored']} labelled cells"]
    lines += [f"{m}: {note}" for m, note in result["methods"].items()]
    return "\n".join(lines)

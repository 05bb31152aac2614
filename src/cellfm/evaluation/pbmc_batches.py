"""The integration benchmark's cells: three real PBMC data sets as batches (batch = data set: 10x
PBMC 4k, Seurat pbmc3k, the celltypist sample) on their common genes, with their label
vocabularies harmonised to coarse types through the explicit table `COARSE_TYPES`. The celltypist
sample is unlabelled: it is embedded and corrected with the others but left out of the scores,
which need a label per cell.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from cellfm.evaluation.data import BENCHMARKS, load_benchmark

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

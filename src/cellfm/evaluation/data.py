"""The fixed, labelled data sets the evaluation runs on, by name, and where to find them.

Each entry says where the file lives under the data folder and which `obs` column holds the
labels. The folder comes from an argument or CELLFM_DATA_DIR, never from where this package is
installed. Loading is all this module does: no normalisation, no filtering beyond dropping cells
whose label means "unlabelled" (`contract.labels`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import anndata as ad

from cellfm.contract.labels import is_unlabelled
from cellfm.wording import UsageError, arg


@dataclass(frozen=True)
class BenchmarkData:
    name: str
    path: str  # relative to the data folder
    label_key: str | None
    description: str


BENCHMARKS: dict[str, BenchmarkData] = {
    "pbmc3k": BenchmarkData(
        "pbmc3k",
        "pbmc3k_clustifyr/pbmc3k_clustifyr_2000hvg.h5ad",
        "classified",
        "Seurat pbmc3k, 9 curated types, 2,000 HVGs",
    ),
    "pbmc4k": BenchmarkData(
        "pbmc4k",
        "pbmc4k_soupx/pbmc4k_soupx_half.h5ad",
        "cell_type",
        "10x PBMC 4k (half), 5 coarse cluster-based types, full transcriptome",
    ),
    "pbmc68k": BenchmarkData(
        "pbmc68k",
        "pbmc68k_reduced_scanpy/pbmc68k_reduced_counts.h5ad",
        "bulk_labels",
        "scanpy pbmc68k_reduced, 10 sorted-population labels, 765 genes",
    ),
    "celltypist": BenchmarkData(
        "celltypist",
        "celltypist_sample/celltypist_sample_559cells.h5ad",
        None,
        "celltypist sample, 559 unlabelled cells",
    ),
    "papalexi": BenchmarkData(
        "papalexi",
        "papalexi2021_eccite_sceptre/papalexi2021_thp1_lowmoi_299genes.h5ad",
        "condition",
        "Papalexi 2021 ECCITE-seq CRISPR-KO screen, 299 genes",
    ),
}

DATA_DIR_ENV = "CELLFM_DATA_DIR"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """`data_dir`, else CELLFM_DATA_DIR; neither set is an error that says how to set one."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    raise UsageError(
        f"no evaluation data folder: pass {arg('data_dir', placeholder='folder')} or set "
        f"{DATA_DIR_ENV} (the folder holding pbmc3k_clustifyr/, pbmc4k_soupx/, ...)"
    )


def data_file(data_dir: str | Path | None, rel: str) -> Path:
    """The file `rel` under the data folder, or an error naming the folder and how to change it."""
    path = resolve_data_dir(data_dir) / rel
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: pass {arg('data_dir', placeholder='folder')} pointing at the data "
            f"folder (the one holding {rel.split('/')[0]}/) or set {DATA_DIR_ENV}"
        )
    return path


def benchmark_path(name: str, data_dir: str | Path | None = None) -> Path:
    if name not in BENCHMARKS:
        raise UsageError(f"unknown evaluation data set {name!r}; choose one of {sorted(BENCHMARKS)}")
    return data_file(data_dir, BENCHMARKS[name].path)


def load_benchmark(name: str, data_dir: str | Path | None = None, drop_unlabelled: bool = True) -> ad.AnnData:
    """Read an evaluation .h5ad; cells whose label means "unlabelled" are dropped when asked."""
    adata = ad.read_h5ad(benchmark_path(name, data_dir))
    key = BENCHMARKS[name].label_key
    if drop_unlabelled and key is not None:
        adata = adata[~is_unlabelled(adata.obs[key])].copy()
    if "gene_symbol" in adata.var.columns:
        adata.var_names = adata.var["gene_symbol"].astype(str).to_numpy()
    adata.var_names_make_unique()
    return adata

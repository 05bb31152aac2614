"""The real labelled data sets the task evaluations run on, by name.

Each entry says where the file lives under the shared data folder and which `obs` column holds the
labels. Loading is all this module does: no normalisation, no filtering beyond dropping cells
whose label means "unlabelled".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import anndata as ad


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

UNLABELLED = {"?", "", "nan", "NA", "unknown", "Unknown"}


def default_data_dir() -> Path:
    """CELLFM_DATA_DIR, else `shared/data` beside the repository checkout."""
    env = os.environ.get("CELLFM_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[4] / "shared" / "data"


def benchmark_path(name: str, data_dir: str | Path | None = None) -> Path:
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark data set {name!r}; choose one of {sorted(BENCHMARKS)}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    path = root / BENCHMARKS[name].path
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: pass --data-dir pointing at the shared data folder (the one holding "
            f"{BENCHMARKS[name].path.split('/')[0]}/) or set CELLFM_DATA_DIR"
        )
    return path


def load_benchmark(name: str, data_dir: str | Path | None = None, drop_unlabelled: bool = True) -> ad.AnnData:
    """Read a benchmark .h5ad; cells whose label is '?' / empty are dropped when asked."""
    import anndata as ad

    adata = ad.read_h5ad(benchmark_path(name, data_dir))
    key = BENCHMARKS[name].label_key
    if drop_unlabelled and key is not None:
        labels = adata.obs[key].astype(str)
        adata = adata[~labels.isin(UNLABELLED).to_numpy()].copy()
    if "gene_symbol" in adata.var.columns:
        adata.var_names = adata.var["gene_symbol"].astype(str).to_numpy()
    adata.var_names_make_unique()
    return adata

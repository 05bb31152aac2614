"""A small Census-shaped SOMA experiment written from real cells of ../shared/data, for tests
without network: three "datasets" (two halves of the SoupX PBMCs with their cell types, the
celltypist sample), Ensembl `feature_id`s (GENCODE v44 names -> ids) with `feature_name`
symbols, obs columns as the Census has them, X layers `raw` (UMI counts) and `normalized`
(log1p CPM, to test the refusal of non-count layers)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def _with_ensembl(a: ad.AnnData, id_of: dict[str, str]) -> ad.AnnData:
    names = a.var_names.astype(str)
    keep = np.array([n in id_of for n in names])
    a = a[:, keep].copy()
    a.var = pd.DataFrame(index=[id_of[n] for n in a.var_names.astype(str)])
    return a[:, ~a.var_names.duplicated()].copy()


def cells_for_soma(shared: Path, per_dataset: int = 240) -> ad.AnnData:
    """(3 * per_dataset) real cells x Ensembl ids, obs columns dataset_id / cell_type / donor_id /
    assay / tissue / tissue_general / is_primary_data."""
    g = pd.read_csv(shared / "gene_vocabularies" / "gencode_v44_gene_id2name.csv", header=None,
                    names=["id", "name"])
    g = g[~g["name"].duplicated(keep=False)]
    id_of = dict(zip(g["name"], g["id"], strict=True))
    pbmc = ad.read_h5ad(shared / "pbmc4k_soupx" / "pbmc4k_soupx_half.h5ad")
    ct = ad.read_h5ad(shared / "celltypist_sample" / "celltypist_sample_559cells.h5ad")
    parts = []
    for i, (a, types) in enumerate([
        (pbmc[:per_dataset], pbmc.obs["cell_type"].astype(str).to_numpy()[:per_dataset]),
        (pbmc[per_dataset : 2 * per_dataset], pbmc.obs["cell_type"].astype(str).to_numpy()[per_dataset:]),
        (ct[:per_dataset], np.full(per_dataset, "unknown")),
    ]):
        a = _with_ensembl(a, id_of)
        a.X = sp.csr_matrix(a.X, dtype=np.float32)
        a.obs = pd.DataFrame({
            "dataset_id": f"dataset{i}",
            "cell_type": types[: a.n_obs],
            "donor_id": [f"donor{i}_{j % 2}" for j in range(a.n_obs)],
            "assay": "10x 3' v2",
            "tissue": "blood",
            "tissue_general": "blood" if i < 2 else "immune system",
            "is_primary_data": i != 1,
        }, index=[f"d{i}_{c}" for c in a.obs_names.astype(str)])
        parts.append(a)
    cells = ad.concat(parts, join="outer", fill_value=0)
    cells.X = sp.csr_matrix(cells.X, dtype=np.float32)
    name_of = {v: k for k, v in id_of.items()}
    cells.var = pd.DataFrame({"feature_id": cells.var_names.astype(str),
                              "feature_name": [name_of[i] for i in cells.var_names]}, index=cells.var_names)
    cells.obs.index.name = None
    return cells


def write_soma_experiment(cells: ad.AnnData, uri: Path) -> Path:
    """`cells` as a SOMA experiment at `uri`: measurement RNA, X layers raw and normalized."""
    import tiledbsoma.io

    a = cells.copy()
    x = sp.csr_matrix(a.X, dtype=np.float64)
    norm = sp.diags(1e4 / np.maximum(1, np.asarray(x.sum(1)).ravel())) @ x
    norm.data = np.log1p(norm.data)
    a.layers["normalized"] = sp.csr_matrix(norm, dtype=np.float32)
    tiledbsoma.io.from_anndata(str(uri), a, measurement_name="RNA", X_layer_name="raw")
    return uri

"""`cellfm.embed` / `get_gene_embeddings` on the real data sets, and their errors on bad input."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import cellfm
from cellfm.embedding import embed, get_gene_embeddings

# (file, var column with symbols or None) — every real .h5ad in shared/data
DATASETS = {
    "pbmc4k_soupx": "pbmc4k_soupx/pbmc4k_soupx_half.h5ad",
    "celltypist_sample": "celltypist_sample/celltypist_sample_559cells.h5ad",
    "pbmc3k_clustifyr": "pbmc3k_clustifyr/pbmc3k_clustifyr_2000hvg.h5ad",
    "pbmc68k_reduced": "pbmc68k_reduced_scanpy/pbmc68k_reduced_counts.h5ad",
    "papalexi": "papalexi2021_eccite_sceptre/papalexi2021_thp1_lowmoi_299genes.h5ad",
}
N_CELLS = 200


@pytest.fixture(scope="module")
def model() -> cellfm.CellFM:
    torch.manual_seed(0)
    return cellfm.CellFM.from_preset("tiny")


def read_cells(shared_data, name: str, n: int = N_CELLS) -> ad.AnnData:
    backed = ad.read_h5ad(shared_data / DATASETS[name], backed="r")
    adata = backed[:n].to_memory()
    backed.file.close()
    return adata


def nonempty(adata: ad.AnnData) -> ad.AnnData:
    X = adata.X
    return adata[np.asarray((X != 0).sum(1)).ravel() > 0].copy()


@pytest.mark.parametrize("name", list(DATASETS))
def test_embed_every_real_dataset(shared_data, model, name):
    adata = read_cells(shared_data, name)
    before_X = adata.X.copy()
    obs_cols, var_cols = list(adata.obs.columns), list(adata.var.columns)
    # max_genes above every cell: no subsampling, so a cell's tokens do not depend on its row
    embed(adata, model, batch_size=32, progress=False, empty="zero", max_genes=10_000)
    emb = adata.obsm["X_cellfm"]
    assert emb.shape == (adata.n_obs, model.config.d_model) and emb.dtype == np.float32
    assert np.isfinite(emb).all()
    info = adata.uns["cellfm"]
    assert info["n_input"] == adata.n_vars
    assert info["n_matched"] + info["n_dropped"] == adata.n_vars
    assert info["n_matched"] > 0.5 * adata.n_vars  # human symbols: most genes match
    assert info["model"]["vocabulary"] == model.config.vocabulary
    # nothing else changed
    assert (adata.X != before_X).nnz == 0 if sp.issparse(before_X) else (adata.X == before_X).all()
    assert list(adata.obs.columns) == obs_cols and list(adata.var.columns) == var_cols
    # row order: cells of very different sizes keep their own embedding
    n_genes = np.asarray((adata.X != 0).sum(1)).ravel()
    picks = [int(np.argmax(n_genes)), int(np.argmin(np.where(n_genes > 0, n_genes, 1 << 30))), 7]
    alone = embed(adata[picks].copy(), model, progress=False, copy=True, empty="zero",
                  max_genes=10_000).obsm["X_cellfm"]
    np.testing.assert_allclose(emb[picks], alone, atol=1e-4, rtol=1e-4)
    # and distinct cells get distinct embeddings
    assert np.abs(emb[picks[0]] - emb[picks[1]]).max() > 1e-3


def test_reversed_rows_give_reversed_embeddings(shared_data, model):
    adata = nonempty(read_cells(shared_data, "pbmc68k_reduced", 120))
    a = embed(adata, model, copy=True, progress=False, batch_size=16).obsm["X_cellfm"]
    b = embed(adata[::-1].copy(), model, copy=True, progress=False, batch_size=16).obsm["X_cellfm"]
    np.testing.assert_allclose(a[::-1], b, atol=1e-5, rtol=1e-5)


def test_copy_returns_new_object_and_leaves_input(shared_data, model):
    adata = nonempty(read_cells(shared_data, "pbmc68k_reduced", 50))
    out = embed(adata, model, copy=True, progress=False, key_added="X_mine")
    assert out is not adata and "X_mine" in out.obsm
    assert "X_mine" not in adata.obsm and "cellfm" not in adata.uns


def test_gene_key_column_equals_var_names(shared_data, model):
    adata = nonempty(read_cells(shared_data, "pbmc4k_soupx", 60))
    a = embed(adata, model, copy=True, progress=False).obsm["X_cellfm"]
    renamed = adata.copy()
    renamed.var_names = [f"g{i}" for i in range(adata.n_vars)]
    b = embed(renamed, model, copy=True, progress=False, gene_key="gene_symbol").obsm["X_cellfm"]
    np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(KeyError, match="not a column of adata.var"):
        embed(adata, model, gene_key="symbols", progress=False)


def test_backed_equals_in_memory(shared_data, model, tmp_path):
    adata = nonempty(read_cells(shared_data, "pbmc4k_soupx", 150))
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    mem = embed(adata, model, copy=True, progress=False, batch_size=16).obsm["X_cellfm"]
    backed = ad.read_h5ad(path, backed="r")
    embed(backed, model, progress=False, batch_size=16)
    np.testing.assert_allclose(backed.obsm["X_cellfm"], mem, atol=1e-6)
    backed.file.close()
    assert "X_cellfm" not in ad.read_h5ad(path).obsm  # the input file is only read


def test_subsampling_of_large_cells_is_reproducible(shared_data, model):
    adata = nonempty(read_cells(shared_data, "pbmc4k_soupx", 40))
    a = embed(adata, model, copy=True, progress=False, max_genes=200).obsm["X_cellfm"]
    b = embed(adata, model, copy=True, progress=False, max_genes=200).obsm["X_cellfm"]
    c = embed(adata, model, copy=True, progress=False, max_genes=200, seed=1).obsm["X_cellfm"]
    full = embed(adata, model, copy=True, progress=False).obsm["X_cellfm"]
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4 and np.abs(a - full).max() > 1e-4


# ---- bad input -------------------------------------------------------------------------------------
def test_lognormalised_layer_is_rejected(shared_data, model):
    adata = read_cells(shared_data, "pbmc3k_clustifyr", 100)
    with pytest.raises(ValueError, match=r"(?i)normali[sz]ed|log|integer|raw count"):
        embed(adata, model, layer="lognorm", progress=False)
    assert "X_cellfm" not in adata.obsm


@pytest.mark.parametrize("bad", ["nan", "negative"])
def test_nan_and_negative_counts_are_rejected(shared_data, model, bad):
    adata = nonempty(read_cells(shared_data, "pbmc68k_reduced", 30))
    X = adata.X.astype(np.float32).tocsr()
    X.data[5] = np.nan if bad == "nan" else -3.0
    adata.X = X
    with pytest.raises(ValueError, match=r"(?i)nan|finite" if bad == "nan" else r"(?i)negative"):
        embed(adata, model, progress=False)


def test_empty_cells_raise_or_get_zero(shared_data, model):
    adata = nonempty(read_cells(shared_data, "pbmc68k_reduced", 30))
    X = adata.X.tolil()
    X[[3, 10]] = 0
    adata.X = X.tocsr()
    with pytest.raises(ValueError, match=r"2 of 30 cells.*filter"):
        embed(adata, model, progress=False)
    embed(adata, model, progress=False, empty="zero")
    emb = adata.obsm["X_cellfm"]
    assert (emb[[3, 10]] == 0).all() and np.isfinite(emb).all() and (np.abs(emb[0]) > 0).any()


@pytest.mark.parametrize("style", ["mouse_ensembl", "mouse_symbols", "random"])
def test_non_matching_gene_names_are_rejected(shared_data, model, style):
    adata = read_cells(shared_data, "pbmc68k_reduced", 20)
    if style == "mouse_ensembl":
        adata.var_names = [f"ENSMUSG{i:011d}" for i in range(adata.n_vars)]
    elif style == "mouse_symbols":  # Cd3e, Ms4a1: match human symbols only when case is ignored
        adata.var_names = [g[0].upper() + g[1:].lower() for g in adata.var_names]
    else:
        adata.var_names = [f"gene_{i}_x" for i in range(adata.n_vars)]
    pattern = r"look like mouse" if style == "mouse_symbols" else r"(?i)none of the .* genes.*vocabulary"
    with pytest.raises(ValueError, match=pattern):
        embed(adata, model, progress=False)
    assert "X_cellfm" not in adata.obsm


# ---- gene embeddings ---------------------------------------------------------------------------------
def test_gene_embeddings_table_and_varm(shared_data, model):
    table = get_gene_embeddings(model)
    assert table.shape == (model.config.n_genes, model.config.d_model)
    assert table.index.is_unique
    some = get_gene_embeddings(model, ["CD3E", "MS4A1", "CD3E"])
    assert list(some.index) == ["CD3E", "MS4A1", "CD3E"]
    np.testing.assert_array_equal(some.loc["MS4A1"].to_numpy(), table.loc["MS4A1"].to_numpy())
    with pytest.raises(KeyError, match="not in vocabulary"):
        get_gene_embeddings(model, ["CD3E", "NOT_A_GENE_123"])

    adata = read_cells(shared_data, "pbmc68k_reduced", 5)
    adata.var_names = list(adata.var_names[:-1]) + ["NOT_A_GENE_123"]
    get_gene_embeddings(model, adata=adata)
    varm = adata.varm["cellfm_gene_emb"]
    assert varm.shape == (adata.n_vars, model.config.d_model)
    assert np.isnan(varm[-1]).all()
    hes4 = list(adata.var_names).index("HES4")
    np.testing.assert_array_equal(varm[hes4], table.loc["HES4"].to_numpy())
    assert np.isfinite(varm[:-1]).sum() > 0.5 * varm[:-1].size


# ---- the Python API speaks Python; non-integer counts; .raw ------------------------------------------
def _lognorm(X) -> sp.csr_matrix:
    X = sp.csr_matrix(X, dtype=np.float32)
    return (sp.diags(1e4 / np.asarray(X.sum(1)).ravel()) @ X).log1p().tocsr()


def test_api_errors_name_python_arguments(shared_data, model):
    adata = nonempty(read_cells(shared_data, "pbmc68k_reduced", 30))
    logged = adata.copy()
    logged.layers["counts"] = logged.X.copy()
    logged.X = _lognorm(logged.X)
    with pytest.raises(ValueError, match=r"log-transformed.*pass layer='counts' \(raw counts found in "
                                         r"layers\['counts'\]\)"):
        embed(logged, model, progress=False)
    embed(logged, model, layer="counts", progress=False)  # the advice works
    dup = adata.copy()
    dup.var_names = [adata.var_names[0], *adata.var_names[:-1]]
    with pytest.raises(ValueError, match=r"more than once.*gene_key=<column>"):
        embed(dup, model, progress=False)
    assert "X_cellfm" not in dup.obsm
    with pytest.raises(ValueError, match=r"device='gpu' is not a device.*device='cpu'"):
        embed(adata, model, device="gpu", progress=False)
    with pytest.raises(KeyError, match=r"layer='nope' is not a layer"):
        embed(adata, model, layer="nope", progress=False)


def test_allow_non_integer_admits_ambient_corrected_counts_only(shared_data, model):
    adata = nonempty(read_cells(shared_data, "pbmc4k_soupx", 60))
    ambient = adata.copy()
    X = sp.csr_matrix(ambient.X, dtype=np.float32, copy=True)
    X.data *= np.random.default_rng(0).uniform(0.55, 0.95, X.nnz).astype(np.float32)  # counts minus soup
    ambient.X = X
    with pytest.raises(ValueError, match=r"allow_non_integer=True"):
        embed(ambient, model, progress=False)
    embed(ambient, model, progress=False, allow_non_integer=True)
    assert np.isfinite(ambient.obsm["X_cellfm"]).all()
    cpm = adata.copy()
    cpm.X = sp.diags(1e6 / np.asarray(adata.X.sum(1)).ravel()) @ sp.csr_matrix(adata.X, dtype=np.float64)
    logged = adata.copy()
    logged.X = _lognorm(adata.X)
    for bad, why in ((cpm, "fixed total"), (logged, "log-transformed")):
        with pytest.raises(ValueError, match=why):
            embed(bad, model, progress=False, allow_non_integer=True)


def test_layer_raw_uses_the_raw_genes(shared_data, model):
    adata = nonempty(read_cells(shared_data, "pbmc4k_soupx", 40))
    full = embed(adata, model, copy=True, progress=False).obsm["X_cellfm"]
    hvg = adata[:, : adata.n_vars // 3].copy()
    hvg.raw = adata
    hvg.X = _lognorm(hvg.X)
    with pytest.raises(ValueError, match=r"pass use_raw=True \(raw counts found in adata.raw\)"):
        embed(hvg, model, progress=False)
    assert embed(hvg, model, use_raw=True, progress=False) is hvg
    np.testing.assert_allclose(hvg.obsm["X_cellfm"], full, atol=1e-6)
    assert hvg.uns["cellfm"]["layer"] == "raw" and hvg.uns["cellfm"]["n_input"] == adata.n_vars
    # a layer really named "raw" is that layer, not adata.raw (scanpy's spelling: use_raw)
    hvg.layers["raw"] = adata[:, : adata.n_vars // 3].X.copy()
    embed(hvg, model, layer="raw", key_added="X_layer_raw", progress=False)
    assert hvg.uns["layer_raw"]["n_input"] == hvg.n_vars and hvg.uns["layer_raw"]["layer"] == "raw"
    assert hvg.uns["cellfm"]["n_input"] == adata.n_vars  # the first record is kept under its own key
    assert not np.allclose(hvg.obsm["X_layer_raw"], hvg.obsm["X_cellfm"])


def test_embedding_of_a_cell_does_not_depend_on_its_row_or_company(shared_data, model, tmp_path):
    """Cells above max_genes are sampled by their own counts: a shuffled subset embeds the same."""
    adata = nonempty(read_cells(shared_data, "pbmc4k_soupx", 120))
    whole = embed(adata, model, copy=True, progress=False, max_genes=200, batch_size=16)
    assert (np.asarray((adata.X > 0).sum(1)).ravel() > 200).sum() > 20  # the sampling path runs
    order = np.random.default_rng(3).permutation(adata.n_obs)[:70]
    part = adata[order].copy()
    part.write_h5ad(tmp_path / "part.h5ad")
    from_file = embed(tmp_path / "part.h5ad", model, progress=False, max_genes=200, batch_size=5)
    np.testing.assert_allclose(from_file.obsm["X_cellfm"], whole.obsm["X_cellfm"][order], atol=1e-5)

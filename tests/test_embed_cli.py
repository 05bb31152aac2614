"""`cellfm embed` command: round trip on real cells, backed mode, every input format, --obsm-only,
--overwrite, --version and help text. Bad input: test_embed_bad_input.py."""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch
import typer
from typer.testing import CliRunner

import cellfm
from cellfm.cli.embed import embed as embed_command
from cellfm.embedding import embed

app = typer.Typer()
app.command()(embed_command)
runner = CliRunner()


@pytest.fixture(scope="module")
def cells(shared_data, tmp_path_factory):
    backed = ad.read_h5ad(shared_data / "pbmc68k_reduced_scanpy/pbmc68k_reduced_counts.h5ad", backed="r")
    adata = backed[:80].to_memory()
    backed.file.close()
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.mark.parametrize("backed", [False, True])
def test_cli_round_trip(model_dir, cells, tmp_path, backed):
    out = tmp_path / "out.h5ad"
    args = [str(cells), "-o", str(out), "--model", str(model_dir), "--device", "cpu", "--batch-size", "16"]
    result = runner.invoke(app, args + (["--backed"] if backed else []))
    assert result.exit_code == 0, result.output
    assert "gene matching" in result.output and "matched" in result.output
    written = ad.read_h5ad(out)
    original = ad.read_h5ad(cells)
    assert written.obsm["X_cellfm"].shape == (80, 32)
    assert list(written.obs_names) == list(original.obs_names)
    assert (written.X != original.X).nnz == 0
    expected = embed(original, cellfm.load(model_dir), copy=True, progress=False).obsm["X_cellfm"]
    np.testing.assert_allclose(written.obsm["X_cellfm"], expected, atol=1e-6)
    assert 0 < written.uns["cellfm"]["n_matched"] <= original.n_vars


def write_10x_mtx(adata: ad.AnnData, folder: Path) -> Path:
    import gzip

    from scipy.io import mmwrite

    folder.mkdir()
    mmwrite(folder / "matrix.mtx", sp.csr_matrix(adata.X).T.tocoo().astype(np.int64))
    with gzip.open(folder / "features.tsv.gz", "wt") as f:
        f.writelines(f"ID{i}\t{g}\tGene Expression\n" for i, g in enumerate(adata.var_names))
    (folder / "barcodes.tsv").write_text("".join(f"{c}\n" for c in adata.obs_names))
    return folder


def write_10x_h5(adata: ad.AnnData, path: Path) -> Path:
    X = sp.csc_matrix(sp.csr_matrix(adata.X).T)  # genes x cells, stored as 10x does
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        for k, v in (("data", X.data), ("indices", X.indices), ("indptr", X.indptr), ("shape", X.shape)):
            g[k] = v
        g["barcodes"] = np.asarray(adata.obs_names, dtype="S")
        feats = g.create_group("features")
        names = np.asarray(adata.var_names, dtype="S")
        feats["name"], feats["id"] = names, np.asarray([f"ID{i}".encode() for i in range(len(names))])
        feats["feature_type"] = np.full(len(names), b"Gene Expression")
    return path


def write_loom(adata: ad.AnnData, path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f["matrix"] = sp.csr_matrix(adata.X).T.toarray().astype(np.float32)
        f["row_attrs/Gene"] = np.asarray(adata.var_names, dtype="S")
        f["col_attrs/CellID"] = np.asarray(adata.obs_names, dtype="S")
    return path


@pytest.mark.parametrize("fmt", ["10x_mtx", "10x_h5", "loom"])
def test_cli_reads_10x_and_loom(model_dir, cells, tmp_path, fmt):
    """The same cells as .h5ad, 10x folder, 10x .h5 and .loom give the same embeddings."""
    original = ad.read_h5ad(cells)
    source = {"10x_mtx": lambda: write_10x_mtx(original, tmp_path / "filtered_feature_bc_matrix"),
              "10x_h5": lambda: write_10x_h5(original, tmp_path / "cells.h5"),
              "loom": lambda: write_loom(original, tmp_path / "cells.loom")}[fmt]()
    out = tmp_path / "out.h5ad"
    r = runner.invoke(app, [str(source), "-o", str(out), "--model", str(model_dir), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    written = ad.read_h5ad(out)
    assert list(written.obs_names) == list(original.obs_names)
    assert list(written.var["gene_symbols"]) == list(original.var_names)
    expected = embed(original, cellfm.load(model_dir), copy=True, progress=False).obsm["X_cellfm"]
    np.testing.assert_allclose(written.obsm["X_cellfm"], expected, atol=1e-5)
    # the Python API reads the same paths
    api = cellfm.embed(source, cellfm.load(model_dir), progress=False)
    np.testing.assert_allclose(api.obsm["X_cellfm"], expected, atol=1e-5)


@pytest.mark.parametrize("suffix", [".h5ad", ".parquet"])
def test_obsm_only_writes_names_and_embedding(model_dir, cells, tmp_path, suffix, monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep --threads 1 out of other tests
    out = tmp_path / f"emb{suffix}"
    base = [str(cells), "-o", str(out), "--model", str(model_dir), "--device", "cpu", "--threads", "1"]
    r = runner.invoke(app, [*base, "--obsm-only"])
    assert r.exit_code == 0, r.output
    full = tmp_path / "full.h5ad"
    assert runner.invoke(app, [str(cells), "-o", str(full), "--model", str(model_dir)]).exit_code == 0
    reference = ad.read_h5ad(full)
    if suffix == ".parquet":
        import pandas as pd

        table = pd.read_parquet(out)
        assert list(table.index) == list(reference.obs_names) and table.shape == (80, 32)
        np.testing.assert_allclose(table.to_numpy(), reference.obsm["X_cellfm"], atol=1e-6)
    else:
        small = ad.read_h5ad(out)
        assert small.n_vars == 0 and list(small.obs_names) == list(reference.obs_names)
        np.testing.assert_allclose(small.obsm["X_cellfm"], reference.obsm["X_cellfm"], atol=1e-6)
        assert small.uns["cellfm"]["n_matched"] == reference.uns["cellfm"]["n_matched"]
    assert out.stat().st_size < full.stat().st_size / 5
    # an existing output is kept unless --overwrite
    before = out.read_bytes()
    r = runner.invoke(app, [*base, "--obsm-only"])
    assert r.exit_code == 2 and "--overwrite" in r.output and out.read_bytes() == before
    r = runner.invoke(app, [*base, "--obsm-only", "--overwrite"])
    assert r.exit_code == 0, r.output


def test_version_and_help_have_no_placeholders():
    from cellfm import __version__
    from cellfm.cli import _register
    from cellfm.cli import app as main_app

    _register()
    r = runner.invoke(main_app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"cellfm {__version__}"
    for command in (["embed"], ["demo"], ["annotate", "fit"], ["corpus", "build"], []):
        text = runner.invoke(main_app, [*command, "--help"]).output
        assert "Usage:" in text
        assert not re.search(r"<\w+>|\{\w+\}", text), text
    text = runner.invoke(main_app, ["embed", "--help"]).output
    for flag in ("--threads", "--overwrite", "--empty", "--allow-non-integer", "--obsm-only"):
        assert flag in text


def test_embed_file_checks_paths_in_the_words_of_the_caller(model_dir, cells, tmp_path):
    """The path checks live in the API (the CLI only calls them): Python callers read argument
    names, CLI users read flags, and nothing is written."""
    from cellfm.embedding.stream import embed_file
    from cellfm.wording import UsageError

    src = cells
    with pytest.raises(FileNotFoundError, match="does not exist"):
        embed_file(tmp_path / "none.h5ad", model_dir, tmp_path / "o.h5ad")
    with pytest.raises(UsageError, match="must differ from the input"):
        embed_file(src, model_dir, src, overwrite=True)
    with pytest.raises(UsageError, match=r"pass obsm_only=True for \.parquet"):
        embed_file(src, model_dir, tmp_path / "o.parquet")
    (tmp_path / "taken.h5ad").write_text("mine")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        embed_file(src, model_dir, tmp_path / "taken.h5ad")
    r = runner.invoke(app, [str(src), "-o", str(tmp_path / "o.parquet"), "--model", str(model_dir)])
    assert r.exit_code == 2 and "pass --obsm-only for .parquet" in r.output
    assert (tmp_path / "taken.h5ad").read_text() == "mine" and not (tmp_path / "o.parquet").exists()

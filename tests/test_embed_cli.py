"""`cellfm embed` command: round trip on real cells, backed mode, clear errors without tracebacks."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

if not (hasattr(pytest.importorskip("cellfm.vocab"), "map_genes")
        and hasattr(pytest.importorskip("cellfm.tokenizer"), "iter_token_batches")):
    pytest.skip("cellfm.vocab / cellfm.tokenizer are not complete", allow_module_level=True)

import cellfm  # noqa: E402
from cellfm.cli.embed import embed as embed_command  # noqa: E402
from cellfm.embed import embed  # noqa: E402

app = typer.Typer()
app.command()(embed_command)
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    return cellfm.CellFM.from_preset("tiny").save(tmp_path_factory.mktemp("model") / "tiny")


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


def test_cli_errors_are_one_line(model_dir, cells, tmp_path, shared_data):
    out = str(tmp_path / "out.h5ad")
    r = runner.invoke(app, [str(tmp_path / "missing.h5ad"), "-o", out, "--model", str(model_dir)])
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output

    r = runner.invoke(app, [str(cells), "-o", out, "--model", str(tmp_path / "no_model")])
    assert r.exit_code == 1 and "could not load model" in r.output and isinstance(r.exception, SystemExit)

    lognorm = shared_data / "pbmc3k_clustifyr/pbmc3k_clustifyr_2000hvg.h5ad"
    r = runner.invoke(app, [str(lognorm), "-o", out, "--model", str(model_dir), "--layer", "lognorm"])
    assert r.exit_code == 1 and "error" in r.output and "Traceback" not in r.output
    assert isinstance(r.exception, SystemExit)

    r = runner.invoke(app, [str(cells), "-o", out, "--model", str(model_dir), "--layer", "nope"])
    assert r.exit_code == 1 and "nope" in r.output and isinstance(r.exception, SystemExit)

    not_h5ad = tmp_path / "x.csv"
    not_h5ad.write_text("a,b\n")
    r = runner.invoke(app, [str(not_h5ad), "-o", out, "--model", str(model_dir)])
    assert r.exit_code == 2 and ".h5ad" in r.output

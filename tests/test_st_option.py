"""The ST-token option outside integration fine-tuning: `embed(..., st_tokens=True)` /
`cellfm embed --st-tokens` on real cells (the bundled 10x PBMCs), and its refusal for models
without ST weights. Annotation with ST tokens: test_st_annotation.py."""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cellfm
from cellfm.cli import _register, app
from cellfm.datasets import EXAMPLE_PATH

_register()
runner = CliRunner()


@pytest.fixture(scope="module")
def cells() -> ad.AnnData:
    """Real raw counts: 24 bundled PBMCs."""
    return ad.read_h5ad(EXAMPLE_PATH)[:24].copy()


@pytest.fixture(scope="module")
def st_model() -> cellfm.CellFM:
    """A random `tiny` model with ST-token weights (official init)."""
    torch.manual_seed(0)
    return cellfm.CellFM.from_preset("tiny", st_tokens=True)


@pytest.fixture(scope="module")
def st_model_dir(st_model, tmp_path_factory):
    return st_model.save(tmp_path_factory.mktemp("st_model") / "tiny_st")


def direct_cls(model: cellfm.CellFM, adata: ad.AnnData, row: int, st: bool) -> np.ndarray:
    """CLS of one cell straight from `CellFMModule.forward`, tokenized here by hand: library
    scaling over all genes, T = the scaled total over the vocabulary genes, S = T."""
    from cellfm.model.st_tokens import st_features
    from cellfm.tokenizer.tokenize import scale_library, tokenize_cell
    from cellfm.vocab import map_genes

    ids = np.asarray(map_genes(adata.var_names, model.vocab).token_ids)
    counts = scale_library(adata.X[row]).toarray().ravel()
    total = counts[ids > 0].sum()
    gene_ids, values = tokenize_cell(ids[ids > 0], counts[ids > 0], total)
    g = torch.from_numpy(gene_ids.astype(np.int64))[None]
    v = torch.from_numpy(values)[None]
    st_feat = st_features(torch.tensor([total], dtype=torch.float32)) if st else None
    with torch.no_grad():
        out = model.module(g, v, torch.ones_like(g, dtype=torch.bool), st_feat=st_feat)
    return out.cell_emb[0].numpy()


def test_embed_with_st_tokens_feeds_the_cells_totals(cells, st_model):
    with_st = cellfm.embed(cells, st_model, copy=True, st_tokens=True, progress=False)
    again = cellfm.embed(cells, st_model, copy=True, st_tokens=True, progress=False)
    without = cellfm.embed(cells, st_model, copy=True, progress=False)
    emb, plain = with_st.obsm["X_cellfm"], without.obsm["X_cellfm"]
    np.testing.assert_array_equal(emb, again.obsm["X_cellfm"])
    assert with_st.uns["cellfm"]["st_tokens"] and not without.uns["cellfm"]["st_tokens"]
    # the ST tokens change every cell's CLS, and the option off is the plain model
    assert np.abs(emb - plain).max(1).min() > 1e-3
    for row in (0, 7, 23):
        np.testing.assert_allclose(emb[row], direct_cls(st_model, cells, row, st=True), atol=2e-5)
        np.testing.assert_allclose(plain[row], direct_cls(st_model, cells, row, st=False), atol=2e-5)


def test_embed_refuses_st_tokens_without_st_weights(cells):
    torch.manual_seed(0)
    plain = cellfm.CellFM.from_preset("tiny")
    with pytest.raises(ValueError, match=r"st_tokens=True needs a model with ST-token weights.*cellfm-80m"):
        cellfm.embed(cells, plain, copy=True, st_tokens=True, progress=False)
    assert "X_cellfm" not in cells.obsm


def test_cli_st_tokens_matches_the_api(cells, st_model, st_model_dir, tmp_path):
    source, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    cells.write_h5ad(source)
    result = runner.invoke(app, ["embed", str(source), "-o", str(out), "--model", str(st_model_dir),
                                 "--device", "cpu", "--batch-size", "8", "--st-tokens"])
    assert result.exit_code == 0, result.output
    written = ad.read_h5ad(out)
    expected = cellfm.embed(cells, st_model, copy=True, st_tokens=True, progress=False).obsm["X_cellfm"]
    np.testing.assert_allclose(written.obsm["X_cellfm"], expected, atol=1e-6)
    assert bool(written.uns["cellfm"]["st_tokens"])


def test_cli_st_tokens_without_st_weights_is_one_error_line(cells, model_dir, tmp_path):
    source, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    cells.write_h5ad(source)
    result = runner.invoke(app, ["embed", str(source), "-o", str(out), "--model", str(model_dir),
                                 "--device", "cpu", "--st-tokens"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines()
             if line.strip() and not line.startswith("cellfm embed:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert re.search(r"--st-tokens needs a model with ST-token weights.*cellfm-80m.*Leave out --st-tokens",
                     lines[0]), lines[0]
    assert "st_tokens=" not in result.output and "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob("out.h5ad*"))

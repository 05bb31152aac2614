"""`cellfm embed CORPUS`: a folder from `cellfm corpus build` streams like an .h5ad (split across
torchrun ranks, chunk by chunk) and gives cell names + embedding. The corpus stores library-scaled
counts of vocabulary genes, so each cell must get exactly the embedding of the same cell read from
its source file. Real PBMCs (pbmc4k), two overlapping inputs, the `tiny` model."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from test_embed_distributed import torchrun_embed

from cellfm.corpus import build_corpus
from cellfm.embedding.stream import embed_file

N_CELLS, CHUNK = 120, 32


@pytest.fixture(scope="module")
def sources(shared_data, tmp_path_factory):
    """Two inputs sharing 40 cells (same ids in both): cells 0-79 and 40-119 of 120 pbmc4k cells
    with at most 2,000 genes (larger cells would be subsampled with a seed that depends on the
    row, which differs between the corpus and the source file)."""
    backed = ad.read_h5ad(shared_data / "pbmc4k_soupx/pbmc4k_soupx_half.h5ad", backed="r")
    first = backed[:400].to_memory()
    backed.file.close()
    cells = first[np.flatnonzero(first.X.getnnz(axis=1) <= 2000)[:N_CELLS]].copy()
    folder = tmp_path_factory.mktemp("sources")
    paths = {"whole": folder / "whole.h5ad", "a": folder / "a.h5ad", "b": folder / "b.h5ad"}
    cells.write_h5ad(paths["whole"])
    cells[:80].copy().write_h5ad(paths["a"])
    cells[40:].copy().write_h5ad(paths["b"])
    return paths


@pytest.fixture(scope="module")
def corpus(sources, tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus") / "corpus"
    manifest = build_corpus([sources["a"], sources["b"]], folder, min_genes=1, max_genes=None, workers=1,
                            progress=False)
    assert manifest.n_cells == 160  # no cell dropped: every row below has its source cell
    return folder


@pytest.fixture(scope="module")
def reference(sources, model_dir, tmp_path_factory):
    """Embeddings of the 120 cells read from the source .h5ad, by cell id."""
    out = tmp_path_factory.mktemp("ref") / "ref.parquet"
    embed_file(sources["whole"], str(model_dir), out, obsm_only=True, device="cpu", chunk_cells=CHUNK,
               progress=False)
    return pd.read_parquet(out)


def test_two_processes_embed_a_corpus_as_its_source_cells(corpus, reference, model_dir, tmp_path):
    out = tmp_path / "corpus_emb.parquet"
    proc = torchrun_embed(corpus, model_dir, out, "--chunk-cells", str(CHUNK))
    assert proc.returncode == 0, proc.text[-3000:]
    assert "rank 0: embedded 3 chunks" in proc.text and "rank 1: embedded 2 chunks" in proc.text
    table = pd.read_parquet(out)
    ids = list(reference.index)
    # ids repeat across the two inputs, so names carry the input file: a.h5ad:<id>, b.h5ad:<id>
    assert list(table.index) == [f"a.h5ad:{c}" for c in ids[:80]] + [f"b.h5ad:{c}" for c in ids[40:]]
    source_rows = np.r_[0:80, 40:120]
    np.testing.assert_allclose(table.to_numpy(), reference.to_numpy()[source_rows], atol=1e-5, rtol=0)

    # one process through the API, .h5ad: the same chunk grid gives the same numbers
    small = tmp_path / "corpus_emb.h5ad"
    result = embed_file(corpus, str(model_dir), small, device="cpu", chunk_cells=CHUNK, progress=False)
    written = ad.read_h5ad(small)
    assert result.computed == 5 and list(written.obs_names) == list(table.index)
    assert written.n_vars == 0 and written.uns["cellfm"]["layer"] == "corpus"
    np.testing.assert_allclose(written.obsm["X_cellfm"], table.to_numpy(), atol=1e-6, rtol=0)


def test_corpus_refuses_layer_and_gene_key(corpus, model_dir, tmp_path):
    for name, value in (("layer", "counts"), ("gene_key", "gene_ids")):
        with pytest.raises(ValueError, match=rf"corpus folder.*leave out {name}='{value}'"):
            embed_file(corpus, str(model_dir), tmp_path / "x.parquet", device="cpu", progress=False,
                       **{name: value})

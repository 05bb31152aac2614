"""Streaming embedding (`cellfm.embed_file`, `cellfm embed` under torchrun): 2 processes on gloo
give the embeddings of 1 process; a stopped run resumes without recomputing finished chunks; a
changed input or model refuses to resume. Real PBMCs, the `tiny` model, chunks of 64 cells."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import cellfm
from cellfm.embedding.stream import embed_file, parts_folder

N_CELLS, CHUNK = 300, 64  # 5 chunks: rank 0 takes 3, rank 1 takes 2


@pytest.fixture(scope="module")
def cells(shared_data, tmp_path_factory):
    backed = ad.read_h5ad(shared_data / "pbmc68k_reduced_scanpy/pbmc68k_reduced_counts.h5ad", backed="r")
    adata = backed[:N_CELLS].to_memory()
    backed.file.close()
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def one_process(cells, model_dir, tmp_path_factory):
    """Embeddings of one uninterrupted in-process run (the reference)."""
    out = tmp_path_factory.mktemp("one") / "emb.h5ad"
    result = embed_file(cells, str(model_dir), out, obsm_only=True, device="cpu", chunk_cells=CHUNK,
                        progress=False)
    assert result.output == out and result.computed == result.n_chunks == 5 and result.skipped == 0
    assert not parts_folder(out).exists()
    return ad.read_h5ad(out).obsm["X_cellfm"]


def torchrun_embed(cells: Path, model_dir: Path, out: Path, *extra: str, stop: int | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cellfm.cli", "embed", str(cells), "-o", str(out), "--model", str(model_dir),
           "--device", "cpu", "--chunk-cells", str(CHUNK), "--batch-size", "16", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if stop is not None:
        env["CELLFM_EMBED_STOP_AFTER_CHUNKS"] = str(stop)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    proc.text = proc.stdout + proc.stderr  # the console writes to stderr
    return proc


def skipped(proc) -> int:
    return sum(int(n) for n in re.findall(r"skipped (\d+) already done", proc.text))


def test_two_processes_give_one_process_embeddings(cells, model_dir, one_process, tmp_path):
    out = tmp_path / "two.h5ad"
    proc = torchrun_embed(cells, model_dir, out)
    assert proc.returncode == 0, proc.text[-3000:]
    assert "rank 1: embedded 2 chunks" in proc.text and "rank 0: embedded 3 chunks" in proc.text
    written, original = ad.read_h5ad(out), ad.read_h5ad(cells)
    np.testing.assert_allclose(written.obsm["X_cellfm"], one_process, atol=1e-6, rtol=0)
    assert list(written.obs_names) == list(original.obs_names)  # the input, copied, plus obsm
    assert (written.X != original.X).nnz == 0 and written.uns["cellfm"]["n_matched"] > 0
    assert not parts_folder(out).exists()
    # the in-memory API agrees (other batch composition: only float rounding differs)
    api = cellfm.embed(original, cellfm.load(model_dir), copy=True, progress=False).obsm["X_cellfm"]
    np.testing.assert_allclose(written.obsm["X_cellfm"], api, atol=1e-5)


def test_stopped_two_process_run_resumes(cells, model_dir, one_process, tmp_path):
    out = tmp_path / "emb.parquet"
    stopped = torchrun_embed(cells, model_dir, out, "--obsm-only", stop=1)
    assert stopped.returncode != 0 and not out.exists()
    assert sorted(p.name for p in parts_folder(out).glob("chunk-*.npy")) == ["chunk-000000.npy",
                                                                              "chunk-000003.npy"]
    resumed = torchrun_embed(cells, model_dir, out, "--obsm-only")
    assert resumed.returncode == 0, resumed.text[-3000:]
    assert skipped(resumed) == 2 and "rank 0: embedded 2 chunks" in resumed.text
    table = pd.read_parquet(out)
    assert list(table.index) == list(ad.read_h5ad(cells).obs_names)
    np.testing.assert_allclose(table.to_numpy(), one_process, atol=1e-6, rtol=0)


def test_stopped_run_resumes_in_one_process(cells, model_dir, one_process, tmp_path, monkeypatch):
    out = tmp_path / "emb.h5ad"
    first = embed_file(cells, str(model_dir), out, obsm_only=True, device="cpu", chunk_cells=CHUNK,
                       progress=False, stop_after_chunks=2)
    assert first.output is None and (first.computed, first.skipped) == (2, 0) and not out.exists()
    saved = sorted(parts_folder(out).glob("chunk-*.npy"))
    assert len(saved) == 2
    stamps = {p.name: p.stat().st_mtime_ns for p in saved}

    import cellfm.embedding.stream as store

    written = []
    save = store.save_chunk
    monkeypatch.setattr(store, "save_chunk", lambda parts, k, emb: (written.append(k), save(parts, k, emb)))
    seen = {}
    merge = store.shutil.rmtree  # look at the parts folder just before it is removed
    monkeypatch.setattr(store.shutil, "rmtree", lambda p: (seen.update(
        {q.name: q.stat().st_mtime_ns for q in Path(p).glob("chunk-*.npy")}), merge(p)))
    second = embed_file(cells, str(model_dir), out, obsm_only=True, device="cpu", chunk_cells=CHUNK,
                        progress=False)
    assert (second.computed, second.skipped) == (3, 2) and written == [2, 3, 4]
    assert all(seen[name] == stamp for name, stamp in stamps.items())  # finished chunks untouched
    np.testing.assert_allclose(ad.read_h5ad(out).obsm["X_cellfm"], one_process, atol=1e-6, rtol=0)


def test_changed_input_or_model_refuses_to_resume(cells, model_dir, tmp_path):
    source = tmp_path / "cells.h5ad"
    source.write_bytes(cells.read_bytes())
    out = tmp_path / "emb.h5ad"
    args = dict(obsm_only=True, device="cpu", chunk_cells=CHUNK, progress=False)
    embed_file(source, str(model_dir), out, stop_after_chunks=1, **args)
    torch.manual_seed(1)
    other = cellfm.CellFM.from_preset("tiny")
    with pytest.raises(ValueError, match=r"another run \(model: .*delete .*\.parts to start over"):
        embed_file(source, other, out, **args)
    adata = ad.read_h5ad(source)
    adata[: N_CELLS - 1].copy().write_h5ad(source)  # same path, other content
    with pytest.raises(ValueError, match=r"another run \(input: .*delete .*\.parts to start over"):
        embed_file(source, str(model_dir), out, **args)
    assert not out.exists() and len(list(parts_folder(out).glob("chunk-*.npy"))) == 1


def test_10x_h5_streams_in_chunks(cells, model_dir, one_process, tmp_path):
    """A 10x .h5 is read through the corpus reader by row slices (its own row index; and, as for
    formats without one, forward across the reader's chunk borders) and gives the embeddings of
    the same cells as .h5ad; the full output holds its counts."""
    from dataclasses import replace

    from test_embed_cli import write_10x_h5

    import cellfm.io.read as cio

    original = ad.read_h5ad(cells)
    source = write_10x_h5(original, tmp_path / "cells.h5")
    _, indexed = cio.open_rows(source)
    forward = cio.SourceRows(replace(indexed.source, rows=None), chunk_size=50)
    X = original.X.tocsr()
    for rows in (indexed, forward):
        for a, b in [(0, 64), (64, 128), (10, 20), (120, 300), (0, 300), (299, 300), (5, 5)]:
            assert (rows[a:b] != X[a:b]).nnz == 0, (a, b)
    out = tmp_path / "emb.h5ad"
    result = embed_file(source, str(model_dir), out, device="cpu", chunk_cells=CHUNK, progress=False)
    assert result.computed == 5
    written = ad.read_h5ad(out)
    np.testing.assert_allclose(written.obsm["X_cellfm"], one_process, atol=1e-6, rtol=0)
    assert (written.X != X).nnz == 0 and list(written.var["gene_symbols"]) == list(original.var_names)
    assert list(written.obs_names) == list(original.obs_names)


@pytest.mark.parametrize("case", ["negative", "empty_cells", "log1p"])
def test_bad_rows_of_one_rank_stop_both_ranks(case, cells, model_dir, tmp_path):
    """Each rank checks only its own rows (rank 1: rows 192-299), yet both ranks stop with the
    error of a full pass, before any chunk is embedded, and neither hangs. log1p: the verdict
    needs every rank's per-cell totals (the second exchange)."""
    adata = ad.read_h5ad(cells)
    X = adata.X.tolil()
    if case == "negative":
        X[250, X.rows[250][0]] = -2
    elif case == "empty_cells":
        X[[200, 280]] = 0
    adata.X = X.tocsr()
    if case == "log1p":
        adata.X = adata.X.astype(np.float32).log1p()
    source = tmp_path / "bad.h5ad"
    adata.write_h5ad(source)
    out = tmp_path / "emb.h5ad"
    proc = torchrun_embed(source, model_dir, out)
    assert proc.returncode != 0 and not out.exists()
    errors = [line for line in proc.text.splitlines() if line.startswith("error:")]
    expected = {"negative": "has negative values", "log1p": "look log-transformed",
                "empty_cells": f"2 of {N_CELLS} cells express none .*first: \\['{adata.obs_names[200]}', "
                               f"'{adata.obs_names[280]}'\\]"}[case]
    assert len(errors) == 2 and all(re.search(expected, e) for e in errors), proc.text[-3000:]
    assert not list(parts_folder(out).glob("chunk-*.npy"))

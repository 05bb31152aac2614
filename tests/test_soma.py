"""A SOMA experiment as a corpus source, without network: a local experiment written with
tiledbsoma from real cells (three datasets, Ensembl feature_ids, Census obs columns) builds into
the same shards as the same cells from an h5ad, keeps its obs columns, refuses bad queries with
one line naming the flag, trains and resumes bitwise; the stream through tiledbsoma-ml gives the
tokens of the corpus. The Census path is this code with `census_version` instead of a uri."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from soma_experiment import cells_for_soma, write_soma_experiment

from cellfm.corpus import CorpusManifest, ShardReader, build_corpus, tokenize_batch
from cellfm.corpus.soma import SomaQuery
from cellfm.corpus.soma_build import build_corpus_from_soma
from cellfm.corpus.soma_stream import SomaStreamDataset, SomaStreamLoader
from cellfm.training import TrainConfig, pretrain


@pytest.fixture(scope="module")
def cells(shared_data):
    return cells_for_soma(shared_data)


@pytest.fixture(scope="module")
def experiment(cells, tmp_path_factory) -> Path:
    return write_soma_experiment(cells, tmp_path_factory.mktemp("soma") / "exp")


@pytest.fixture(scope="module")
def soma_corpus(experiment, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("soma_corpus")
    build_corpus_from_soma(SomaQuery(uri=str(experiment)), out, workers=1, shard_cells=300, progress=False)
    return out


def _rows(folder: Path) -> dict[str, tuple]:
    """cell id -> (gene ids, counts, labels, batch) over all shards of a corpus."""
    out = {}
    for s in CorpusManifest.load(folder).shards:
        t = ShardReader(folder / s.file).read_table().to_pylist()
        for r in t:
            out[r["cell_id"]] = (r["gene_ids"], r["counts"], dict(r["labels"]), r["batch"], r["source_row"])
    return out


def test_soma_corpus_equals_the_h5ad_corpus(cells, experiment, soma_corpus, tmp_path):
    m = CorpusManifest.load(soma_corpus)
    rep = m.report.iloc[0]
    assert rep["status"] == "added" and rep["format"] == "soma" and rep["cells_read"] == cells.n_obs
    assert len(m.shards) == 3  # one shard per part of 300 selected cells
    assert (soma_corpus / "report.tsv").read_text().count("\n") == 2
    assert not (soma_corpus / ".soma_parts").exists()

    h5ad = tmp_path / "cells.h5ad"  # symbols as names: they match a few more genes than the ids,
    sym = cells.copy()  # so the SOMA build (which takes whichever matches more) maps by them too
    sym.var_names = sym.var["feature_name"].to_numpy()
    sym.write_h5ad(h5ad)
    ref = build_corpus([h5ad], tmp_path / "ref", workers=1, progress=False)
    assert ref.n_cells == m.n_cells == rep["cells_kept"]
    a, b = _rows(soma_corpus), _rows(tmp_path / "ref")
    assert a.keys() == b.keys()
    for cell, (ids, counts, labels, batch, row) in a.items():
        assert ids == b[cell][0] and counts == b[cell][1]
        assert labels["cell_type"] == b[cell][2]["cell_type"] and batch == labels["dataset_id"]
        assert row == list(cells.obs_names).index(cell)  # source row = soma_joinid
    kept = {labels["dataset_id"] for _, _, labels, _, _ in a.values()}
    assert kept == {"dataset0", "dataset1", "dataset2"}
    assert {"assay", "donor_id", "tissue", "tissue_general"} <= set(next(iter(a.values()))[2])

    # built again with the same query: nothing rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in soma_corpus.glob("*.arrow")}
    build_corpus_from_soma(SomaQuery(uri=str(experiment)), soma_corpus, workers=1, shard_cells=300,
                           progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in soma_corpus.glob("*.arrow")} == mtimes


def test_filter_and_bad_queries_name_the_flag(experiment, tmp_path):
    q = SomaQuery(uri=str(experiment), obs_filter="is_primary_data == True and tissue_general == 'blood'")
    m = build_corpus_from_soma(q, tmp_path / "c", workers=2, shard_cells=100, progress=False)
    rows = _rows(tmp_path / "c")
    assert {r[2]["dataset_id"] for r in rows.values()} == {"dataset0"}  # dataset1 not primary, 2 not blood
    assert m.report.iloc[0]["cells_read"] == 240

    cli = [sys.executable, "-m", "cellfm.cli", "corpus", "build", str(experiment), "-j", "1"]
    for i, (flags, words) in enumerate([(["--obs-filter", "dataset_id == 'none'"], "--obs-filter"),
                         (["--layer", "counts"], "--layer"),
                         (["--layer", "normalized"], "--layer"),
                         (["--measurement", "ATAC"], "--measurement")]):
        p = subprocess.run(cli + flags + ["-o", str(tmp_path / f"bad{i}")], capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 1, p.stderr[-2000:]
        line = next(ln for ln in p.stdout.splitlines() if ln.startswith("skipped"))
        assert words in line, line
        if flags[-1] == "normalized":
            assert "log-transformed" in line


def test_stream_gives_the_corpus_tokens_and_covers_every_cell(experiment, soma_corpus):
    q = SomaQuery(uri=str(experiment))
    ds = SomaStreamDataset(q, seed=3, epoch=1, batch_size=16)
    batches = list(SomaStreamLoader(ds))
    rows = {r[4]: r for r in _rows(soma_corpus).values()}  # soma_joinid -> shard row
    streamed = torch.cat([b.cell_index for b in batches]).tolist()
    assert len(streamed) == len(set(streamed))
    assert set(rows) <= set(streamed)  # the corpus also drops cells above 2048 genes; the stream samples them
    for b in batches[:4]:
        take = [i for i, c in enumerate(b.cell_index.tolist()) if c in rows]
        ids = [rows[b.cell_index[i].item()] for i in take]
        indptr = np.concatenate([[0], np.cumsum([len(r[0]) for r in ids])])
        ref = tokenize_batch(b.cell_index[take].numpy(), indptr, np.concatenate([r[0] for r in ids]),
                             np.concatenate([r[1] for r in ids]), seed=3, epoch=1)
        L = ref.gene_ids.shape[1]
        for f in ("gene_ids", "values", "token_mask", "hidden_mask", "loss_mask"):
            assert torch.equal(getattr(b, f)[take][:, :L], getattr(ref, f)), f

    # resume mid-epoch: the rest of the epoch is the same batches
    loader = SomaStreamLoader(SomaStreamDataset(q, seed=3, epoch=1, batch_size=16))
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    again = SomaStreamLoader(SomaStreamDataset(q, seed=3, batch_size=16))
    again.load_state_dict(state)
    rest = list(again)
    assert len(rest) == len(batches) - 5
    assert all(torch.equal(x.gene_ids, y.gene_ids) for x, y in zip(rest, batches[5:], strict=True))


def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), preset="tiny", batch_size=16, max_steps=12, lr=2e-3, start_lr=1e-5,
                min_lr=1e-4, warmup_steps=2, eval_every=6, eval_batches=2, ckpt_every=4, log_every=2,
                threads=1, progress=False, val_fraction=0.05, model={"dropout": 0.1})
    base.update(kw)
    return TrainConfig(**base)


def _weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


@pytest.mark.parametrize("source", ["corpus", "stream"])
def test_pretrain_from_soma_resumes_bitwise(source, experiment, soma_corpus, tmp_path):
    kw = {"corpus_dir": str(soma_corpus)} if source == "corpus" else \
        {"corpus_dir": "", "soma": {"uri": str(experiment)}}
    whole = _weights(pretrain(_cfg(tmp_path / "whole", **kw)))
    run = tmp_path / "stopped"
    pretrain(_cfg(run, stop_after_steps=6, **kw))
    resumed = _weights(pretrain(_cfg(run, **kw)))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)

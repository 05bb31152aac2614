"""build_corpus on real data: every format gives the same rows, official filters and scaling,
bad files are reported and skipped, re-runs add only new inputs; the CLI."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from cellfm.corpus import CorpusManifest, ShardReader, build_corpus
from cellfm.corpus.vocabulary_link import load_vocabulary, token_ids_for

N_CELLS = 150


def _mini_corpus_files(shared: Path) -> list[Path]:
    m = pd.read_csv(shared / "mini_corpus" / "MANIFEST.tsv", sep="\t")
    return [(shared / "mini_corpus" / p).resolve() for p in m["path"]]


@pytest.fixture(scope="module")
def pbmc(shared_data):
    """150 PBMCs (raw counts), restricted to the genes expressed in them (totals unchanged)."""
    import anndata as ad

    a = ad.read_h5ad(shared_data / "pbmc4k_soupx" / "pbmc4k_soupx_half.h5ad")[:N_CELLS]
    x = sp.csr_matrix(a.X)
    keep = np.flatnonzero(np.asarray((x > 0).sum(0)).ravel())
    a = a[:, keep].copy()
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    return a


@pytest.fixture(scope="module")
def format_files(pbmc, tmp_path_factory):
    """The same cells written as h5ad, 10x mtx folder, 10x h5 (v3 and v2), loom, csv, tsv.gz
    with genes as rows."""
    d = tmp_path_factory.mktemp("formats")
    x = sp.csr_matrix(pbmc.X)  # (cells, genes)
    genes = pbmc.var_names.to_numpy().astype(str)
    ids = np.array([f"ENSGFAKE{i:07d}" for i in range(len(genes))])
    cells = pbmc.obs_names.to_numpy().astype(str)
    files = {}

    files["h5ad"] = d / "pbmc.h5ad"
    pbmc.write_h5ad(files["h5ad"])

    mtx = d / "pbmc_mtx"
    mtx.mkdir()
    with gzip.open(mtx / "matrix.mtx.gz", "wb") as f:
        scipy.io.mmwrite(f, sp.coo_matrix(x.T.astype(np.int64)))
    pd.DataFrame({"id": ids, "name": genes, "t": "Gene Expression"}).to_csv(
        mtx / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(cells).to_csv(mtx / "barcodes.tsv.gz", header=False, index=False)
    files["10x_mtx"] = mtx

    csc = sp.csc_matrix(x.T.astype(np.int32))  # genes x cells, CSC: one column per cell
    files["10x_h5_v3"] = d / "pbmc_v3.h5"
    with h5py.File(files["10x_h5_v3"], "w") as f:
        g = f.create_group("matrix")
        for k, v in (("data", csc.data), ("indices", csc.indices), ("indptr", csc.indptr),
                     ("shape", np.array(csc.shape)), ("barcodes", cells.astype("S"))):
            g[k] = v
        # one antibody feature that must be ignored (and not count towards the library size)
        g["features/name"] = np.append(genes, "CD3_TotalSeqB").astype("S")
        g["features/id"] = np.append(ids, "CD3").astype("S")
        g["features/feature_type"] = np.array(["Gene Expression"] * len(genes) + ["Antibody Capture"], "S")
        ab = sp.csc_matrix(sp.vstack([csc, sp.csr_matrix(np.full((1, csc.shape[1]), 500, np.int32))]))
        del g["data"], g["indices"], g["indptr"], g["shape"]
        g["data"], g["indices"], g["indptr"], g["shape"] = ab.data, ab.indices, ab.indptr, np.array(ab.shape)
    files["10x_h5_v2"] = d / "pbmc_v2.h5"
    with h5py.File(files["10x_h5_v2"], "w") as f:
        g = f.create_group("GRCh38")
        for k, v in (("data", csc.data), ("indices", csc.indices), ("indptr", csc.indptr),
                     ("shape", np.array(csc.shape)), ("barcodes", cells.astype("S")),
                     ("genes", ids.astype("S")), ("gene_names", genes.astype("S"))):
            g[k] = v

    files["loom"] = d / "pbmc.loom"
    with h5py.File(files["loom"], "w") as f:
        f["matrix"] = x.T.toarray().astype(np.float32)  # genes x cells
        f["row_attrs/Gene"] = genes.astype("S")
        f["col_attrs/CellID"] = cells.astype("S")
        f["col_attrs/cell_type"] = pbmc.obs["cell_type"].astype(str).to_numpy().astype("S")

    dense = pd.DataFrame(x.toarray().astype(np.int64), index=cells, columns=genes)
    files["csv"] = d / "pbmc.csv"
    dense.to_csv(files["csv"])
    files["tsv_genes_rows"] = d / "pbmc_t.tsv.gz"
    dense.T.to_csv(files["tsv_genes_rows"], sep="\t")
    return files


@pytest.fixture(scope="module")
def built(shared_data, format_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    inputs = _mini_corpus_files(shared_data) + list(format_files.values())
    m = build_corpus(inputs, out, workers=2, progress=False, chunk_cells=64)
    return out, m


def _rows_by_source(out: Path, m: CorpusManifest) -> dict[str, pd.DataFrame]:
    res = {}
    for s in m.shards:
        t = ShardReader(out / s.file).read_table().to_pandas()
        res[s.source] = pd.concat([res[s.source], t]) if s.source in res else t
    return res


def test_every_input_reported_and_added(built, shared_data, format_files):
    out, m = built
    rep = m.report.set_index("input")
    assert (out / "report.tsv").exists() and (out / "manifest.json").exists()
    assert (rep["status"] == "added").all(), rep[rep.status != "added"]["reason"].tolist()
    assert (rep["cells_read"] == rep["cells_kept"] + rep["dropped_too_few_genes"]
            + rep["dropped_too_many_genes"] + rep["dropped_empty"]).all()
    assert m.n_cells == rep["cells_kept"].sum() == sum(s.n_cells for s in m.shards)
    # official filters: the 299-gene panel cannot reach 200 expressed genes; 4k PBMCs lose > 2048
    papalexi = rep.loc[str(_mini_corpus_files(shared_data)[4])]
    assert papalexi["cells_kept"] == 0 and papalexi["dropped_too_few_genes"] == papalexi["cells_read"]
    assert rep.loc[str(_mini_corpus_files(shared_data)[0]), "dropped_too_many_genes"] > 0
    assert m.verify(out) == []


def test_all_formats_give_the_same_rows(built, format_files):
    out, m = built
    rows = _rows_by_source(out, m)
    ref = rows[str(format_files["h5ad"].resolve())].set_index("cell_id")
    assert len(ref) > 100
    for name, path in format_files.items():
        other = rows[str(Path(path).resolve())].set_index("cell_id")
        assert list(other.index) == list(ref.index), name
        for c in ref.index[:: 7]:
            np.testing.assert_array_equal(other.at[c, "gene_ids"], ref.at[c, "gene_ids"], err_msg=name)
            np.testing.assert_array_equal(other.at[c, "counts"], ref.at[c, "counts"], err_msg=name)


def test_rows_follow_the_official_preprocessing(built, pbmc, format_files):
    """round(count / max(1, total_all_genes / 1e5)) on matched genes, sorted by token id, and
    only cells with 200..2048 expressed matched genes."""
    out, m = built
    t = _rows_by_source(out, m)[str(format_files["h5ad"].resolve())].set_index("cell_id")
    from cellfm.tokenizer import scale_library

    scaled = scale_library(pbmc.X).toarray()  # over all genes of the file
    tok = token_ids_for(pbmc.var_names, load_vocabulary("cellfm-27k"))
    for i, c in enumerate(pbmc.obs_names):
        cols = np.flatnonzero((tok > 0) & (scaled[i] > 0))
        n = len(np.unique(tok[cols]))
        if not 200 <= n <= 2048:
            assert c not in t.index
            continue
        order = np.argsort(tok[cols], kind="stable")
        np.testing.assert_array_equal(t.at[c, "gene_ids"], tok[cols][order])
        np.testing.assert_array_equal(t.at[c, "counts"], scaled[i, cols][order])
    assert t["labels"].iloc[0] and dict(t["labels"].iloc[0])["cell_type"]


def test_bad_files_are_reported_and_skipped(pbmc, format_files, shared_data, tmp_path):
    good = format_files["h5ad"]
    truncated = tmp_path / "truncated.h5ad"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.h5ad"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    lognorm = tmp_path / "lognorm.h5ad"
    a = pbmc.copy()
    a.X = sp.csr_matrix(np.log1p(a.X.toarray() / a.X.sum(1).A * 1e4))
    a.write_h5ad(lognorm)
    mouse = tmp_path / "mouse.h5ad"
    b = pbmc.copy()
    b.var_names = [g.capitalize() for g in b.var_names]
    b.write_h5ad(mouse)
    m = build_corpus([truncated, good, garbage, lognorm, mouse], tmp_path / "c", workers=2, progress=False)
    rep = m.report.set_index("input")
    assert rep.loc[str(good.resolve()), "status"] == "added" and m.n_cells > 0
    for bad, why in ((truncated, ""), (garbage, ""), (lognorm, "log-transformed"), (mouse, "mouse")):
        row = rep.loc[str(bad.resolve())]
        assert row["status"] == "skipped" and why in row["reason"], row["reason"]
    assert {s.source for s in m.shards} == {str(good.resolve())}
    assert not list((tmp_path / "c").glob(".*.tmp"))


def test_rerun_adds_only_new_inputs(format_files, tmp_path):
    out = tmp_path / "c"
    first = build_corpus([format_files["h5ad"]], out, workers=1, progress=False)
    old = {s.file: (out / s.file).stat().st_mtime_ns for s in first.shards}
    again = build_corpus([format_files["h5ad"], format_files["loom"]], out, workers=1, progress=False)
    assert [s.file for s in again.shards[: len(old)]] == list(old)
    assert {s.file: (out / s.file).stat().st_mtime_ns for s in again.shards[: len(old)]} == old
    assert again.n_cells == 2 * first.n_cells and len(again.inputs) == 2
    same = build_corpus([format_files["loom"]], out, workers=1, progress=False)
    assert same.n_cells == again.n_cells and len(same.shards) == len(again.shards)


def test_cli_build_and_info(format_files, tmp_path):
    from typer.testing import CliRunner

    from cellfm.cli.corpus import app

    out = tmp_path / "c"
    args = ["build", str(format_files["h5ad"]), str(format_files["loom"]), "-o", str(out), "-j", "1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "added" in r.output
    r = CliRunner().invoke(app, ["info", str(out), "--verify"])
    assert r.exit_code == 0 and "all shards OK" in r.output, r.output
    shutil.rmtree(out)


def test_folder_input_expands_to_count_files(format_files):
    from cellfm.corpus.builder import expand_inputs

    folder = Path(format_files["h5ad"]).parent
    found = {p.name for p in expand_inputs([folder])}
    assert found == {"pbmc.h5ad", "pbmc_mtx", "pbmc_v3.h5", "pbmc_v2.h5", "pbmc.loom"}

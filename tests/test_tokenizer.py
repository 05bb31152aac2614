"""Tokenization as the official pipeline, masks, the count checks and AnnData batching through the
input contract."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import cellfm
from cellfm.contract import check_counts, setup_cells
from cellfm.tokenizer import cell_rng, collate_cells, mask_values, scale_library, tokenize_cell

TINY = cellfm.CellFM.from_preset("tiny")  # its vocabulary and config: what the contract reads


def test_tokenize_cell_by_hand():
    ids, vals = tokenize_cell(np.array([30, 10, 20, 40]), np.array([2.0, 0.0, 6.0, 2.0]), total=10.0)
    assert ids.tolist() == [20, 30, 40]  # zero dropped, sorted by id
    np.testing.assert_allclose(vals, np.log1p(np.array([6, 2, 2]) / 10 * 1e4), rtol=1e-6)
    assert vals.dtype == np.float32


def test_scale_library_caps_large_cells():
    m = sp.csr_matrix(np.array([[100_000.0, 100_000.0, 3], [5, 0, 7]]))
    s = scale_library(m).toarray()
    np.testing.assert_array_equal(s[1], [5, 0, 7])  # small cells untouched
    np.testing.assert_array_equal(s[0], np.round(np.array([100_000, 100_000, 3]) / 2.00003))


def test_sampling_above_max_genes_is_log1p_weighted_and_reproducible():
    n = 300
    counts = np.ones(n)
    counts[:100] = 1000  # log1p weight ~6.9 vs 0.69
    ids = np.arange(1, n + 1)
    picks = np.zeros(n)
    for seed in range(200):
        got, vals = tokenize_cell(ids, counts, counts.sum(), max_genes=50, rng=np.random.default_rng(seed))
        assert len(got) == 50 and np.all(np.diff(got) > 0)
        picks[got - 1] += 1
    assert picks[:100].mean() > 5 * picks[100:].mean()
    a = tokenize_cell(ids, counts, counts.sum(), 50, np.random.default_rng(7))[0]
    b = tokenize_cell(ids, counts, counts.sum(), 50, np.random.default_rng(7))[0]
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="rng"):
        tokenize_cell(ids, counts, counts.sum(), max_genes=50)


def test_mask_values_official_semantics():
    hidden, loss = mask_values(100, np.random.default_rng(0))
    assert loss.sum() == 20 and hidden.sum() == 16 and not (hidden & ~loss).any()
    hidden, loss = mask_values(4, np.random.default_rng(0))  # int(0.2 * 4) == 0: official quirk
    assert loss.all() and not hidden.any()


def test_collate_pads_to_longest():
    b = collate_cells([(np.array([1, 2]), np.array([0.5, 1.0], np.float32)),
                       (np.array([3]), np.array([2.0], np.float32))], cell_index=[4, 9])
    assert b.gene_ids.tolist() == [[1, 2], [3, 0]]
    assert b.token_mask.tolist() == [[True, True], [True, False]]
    assert b.cell_index.tolist() == [4, 9]


def _pbmc(shared_data, n=300):
    a = ad.read_h5ad(shared_data / "pbmc4k_soupx" / "pbmc4k_soupx_half.h5ad")
    return a[:n].copy()


def test_batches_match_per_cell_tokenizer_and_cover_all_cells(shared_data):
    a = _pbmc(shared_data)
    cells = setup_cells(a, TINY, max_genes=512)
    m = cells.mapping
    batches = list(cells.batches(32, chunk_size=100))
    seen = np.concatenate([b.cell_index.numpy() for b in batches])
    assert sorted(seen.tolist()) == list(range(a.n_obs))
    scaled = scale_library(a.X)
    ids_col = m.token_ids
    for b in batches[:3]:
        for j, row in enumerate(b.cell_index.tolist()):
            r = scaled[row]
            keep = ids_col[r.indices] > 0
            total = r.data[keep].sum()
            order = np.argsort(ids_col[r.indices][keep])
            ids, cnt = ids_col[r.indices][keep][order], r.data[keep][order].astype(np.float64)
            want_ids, want_vals = tokenize_cell(ids, cnt, total, 512, cell_rng(0, ids, cnt))
            n = int(b.token_mask[j].sum())
            assert np.array_equal(b.gene_ids[j, :n].numpy(), want_ids)
            np.testing.assert_allclose(b.values[j, :n].numpy(), want_vals, rtol=1e-6)
    lens = [int(b.token_mask.sum(1).max()) for b in batches]
    assert lens == sorted(lens) or len(set(lens)) > 1  # grouped by length within chunks


def test_backed_equals_in_memory(shared_data, tmp_path):
    a = _pbmc(shared_data, 200)
    a.write_h5ad(tmp_path / "x.h5ad")
    backed = ad.read_h5ad(tmp_path / "x.h5ad", backed="r")
    mem = list(setup_cells(a, TINY).batches(50, chunk_size=64))
    bak = list(setup_cells(backed, TINY).batches(50, chunk_size=64))
    assert len(mem) == len(bak)
    for x, y in zip(mem, bak, strict=True):
        assert x.gene_ids.equal(y.gene_ids) and x.values.equal(y.values) and x.cell_index.equal(y.cell_index)


def test_check_counts_errors(shared_data):
    a = ad.read_h5ad(shared_data / "pbmc3k_clustifyr" / "pbmc3k_clustifyr_2000hvg.h5ad")
    assert check_counts(a.X)["n_cells"] == a.n_obs
    with pytest.raises(ValueError, match="log-transformed"):
        check_counts(a.layers["lognorm"])
    x = sp.csr_matrix(a.X[:50], dtype=np.float32)
    bad = x.copy()
    bad.data[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        check_counts(bad)
    bad = x.copy()
    bad.data[0] = -1
    with pytest.raises(ValueError, match="negative"):
        check_counts(bad)
    empty = sp.vstack([x, sp.csr_matrix((2, x.shape[1]), dtype=np.float32)]).tocsr()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert check_counts(empty)["n_empty"] == 2
        assert any("no counts" in str(i.message) for i in w)
    with pytest.raises(ValueError, match="filter_cells"):
        check_counts(empty, allow_empty=False)
    dup = a[:, :10].copy()
    dup.var_names = ["G"] * 10
    with pytest.raises(ValueError, match="occur more than once.*gene_key=<column>"):
        setup_cells(dup, TINY)


def _tokens_by_cell(cells, batch_size: int, chunk_size: int) -> dict[int, tuple]:
    out = {}
    for b in cells.batches(batch_size, chunk_size=chunk_size):
        for j, row in enumerate(b.cell_index.tolist()):
            n = int(b.token_mask[j].sum())
            out[row] = (b.gene_ids[j, :n].numpy().copy(), b.values[j, :n].numpy().copy())
    return out


def test_large_cells_are_sampled_by_content_not_row(shared_data):
    """A cell above max_genes gets the same tokens in any subset, order, chunking or batch size."""
    a = _pbmc(shared_data, 300)
    whole = _tokens_by_cell(setup_cells(a, TINY, max_genes=300), 32, 100)
    long = [r for r, (ids, _) in whole.items() if len(ids) == 300]
    assert len(long) > 20  # the sampling path really runs
    order = np.random.default_rng(1).permutation(a.n_obs)[:150]
    part = _tokens_by_cell(setup_cells(a[order].copy(), TINY, max_genes=300), 7, 33)
    for new_row, old_row in enumerate(order):
        assert np.array_equal(part[new_row][0], whole[old_row][0])
        assert np.array_equal(part[new_row][1], whole[old_row][1])

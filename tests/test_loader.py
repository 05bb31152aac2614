"""CorpusDataset / CorpusLoader: exact coverage per epoch across ranks and workers, reproducible
shuffling, exact mid-epoch resume, held-out split, and equality with the per-cell tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cellfm.tokenizer as tokenizer
from cellfm.corpus import CorpusDataset, CorpusLoader, CorpusManifest, ShardInfo, cell_generator
from cellfm.corpus.shards import CellRows, ShardWriter

N_CELLS = 523  # not a multiple of any batch size used below


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three shards of uneven sizes; some cells longer than max_genes=64 (sampling path)."""
    out = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    shards = []
    start = 0
    for k, n in enumerate((200, 123, 200)):
        w = ShardWriter(out, f"s{k}", shard_cells=10_000)
        lens = rng.integers(5, 90, n)
        indptr = np.concatenate([[0], np.cumsum(lens)])
        ids = np.concatenate([np.sort(rng.choice(np.arange(1, 2000), m, replace=False)) for m in lens])
        counts = rng.geometric(0.3, int(indptr[-1])).astype(np.uint32)
        counts[::97] = 150  # a few counts above the value table
        cells = [f"cell{start + i}" for i in range(n)]
        w.write(CellRows(indptr=indptr, gene_ids=ids.astype(np.uint16), counts=counts, cell_id=cells,
                         source_row=np.arange(n), batch=["b"] * n, labels=[{"t": "x"}] * n,
                         raw_total=np.zeros(n, np.float32), source=f"src{k}"))
        shards += [ShardInfo(f, c, h, f"src{k}") for f, c, h in w.close()]
        start += n
    CorpusManifest(vocabulary={"name": "test", "n_genes": 2000, "sha256": ""},
                   filters={"min_genes": 0, "max_genes": None}, shards=shards).save(out)
    return out


def _ds(corpus, **kw):
    # without the tokenizer: plan, coverage and resume still run (no masks, no 64-gene sampling)
    args = dict(seed=3, epoch=0, rank=0, world_size=1, batch_size=16,
                max_genes=64, mask=True)
    args.update(kw)
    return CorpusDataset(corpus, **args)


def _stream(corpus, num_workers=0, **kw):
    return list(CorpusLoader(_ds(corpus, **kw), num_workers=num_workers))


def _index(batches):
    return torch.cat([b.cell_index for b in batches]).tolist()


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for f in ("gene_ids", "values", "token_mask", "hidden_mask", "loss_mask", "cell_index"):
            u, v = getattr(x, f), getattr(y, f)
            assert (u is None and v is None) or torch.equal(u, v), f


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_cell_once_per_epoch(corpus, world_size, num_workers):
    per_rank = [_stream(corpus, num_workers, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(s) for s in per_rank}) == 1  # equal number of batches per rank (DDP)
    seen = [i for s in per_rank for i in _index(s)]
    assert sorted(seen) == list(range(N_CELLS))
    sizes = {len(b) for s in per_rank for b in s}
    assert max(sizes) - min(sizes) <= 1 and max(sizes) <= 16


def test_stream_independent_of_workers(corpus):
    _same(_stream(corpus, 0), _stream(corpus, 2))


def test_tail_drop_gives_full_batches(corpus):
    s = _stream(corpus, 0, tail="drop", world_size=2, rank=1)
    assert len(s) == N_CELLS // 32 and all(len(b) == 16 for b in s)


def test_shuffle_per_epoch_and_seed(corpus):
    e0, e0_again = _index(_stream(corpus, epoch=0)), _index(_stream(corpus, epoch=0))
    e1, other_seed = _index(_stream(corpus, epoch=1)), _index(_stream(corpus, seed=4))
    assert e0 == e0_again
    assert e0 != e1 and sorted(e0) == sorted(e1)
    assert e0 != other_seed


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_equals_tail(corpus, num_workers):
    full = _stream(corpus, num_workers, world_size=2, rank=1, epoch=2)
    loader = CorpusLoader(_ds(corpus, world_size=2, rank=1, epoch=2), num_workers=num_workers)
    it = iter(loader)
    head = [next(it) for _ in range(5)]
    state = loader.state_dict()
    del it
    assert state["epoch"] == 2 and state["batches_consumed"] == 5
    resumed = CorpusLoader(_ds(corpus, world_size=2, rank=1), num_workers=num_workers)
    resumed.load_state_dict(state)
    assert len(resumed) == len(full) - 5
    _same(head + list(resumed), full)


def test_batch_equals_per_cell_tokenizer(corpus):
    """The vectorised batch is what tokenize_cell + mask_values give per cell (incl. sampling)."""
    from cellfm.corpus.shards import ShardReader

    m = CorpusManifest.load(corpus)
    rows = {}
    g = 0
    for s in m.shards:
        r = ShardReader(corpus / s.file)
        indptr, ids, counts = r.take(np.arange(len(r)))
        for i in range(len(r)):
            rows[g + i] = (ids[indptr[i]:indptr[i + 1]], counts[indptr[i]:indptr[i + 1]])
        g += len(r)
    for b in _stream(corpus, epoch=1)[:6]:
        cells = []
        for j, ci in enumerate(b.cell_index.tolist()):
            gid, cnt = rows[ci]
            rng = cell_generator(3, 1, ci)
            ids, vals = tokenizer.tokenize_cell(gid.astype(np.int64), cnt.astype(np.float64),
                                                float(cnt.sum()), max_genes=64, rng=rng)
            hidden, loss = tokenizer.mask_values(len(ids), rng, mask_ratio=0.2, hide_fraction=0.8)
            n = len(ids)
            assert int(b.token_mask[j].sum()) == n
            np.testing.assert_array_equal(b.gene_ids[j, :n].numpy(), np.asarray(ids))
            np.testing.assert_array_equal(b.values[j, :n].numpy(), np.asarray(vals, np.float32))
            np.testing.assert_array_equal(b.hidden_mask[j, :n].numpy(), np.asarray(hidden))
            np.testing.assert_array_equal(b.loss_mask[j, :n].numpy(), np.asarray(loss))
            assert not b.values[j, n:].any() and not b.gene_ids[j, n:].any()
            cells.append((ids, vals, hidden, loss))
        _same([tokenizer.collate_cells(cells, cell_index=b.cell_index.numpy())], [b])


def test_heldout_split_is_deterministic_and_disjoint(corpus):
    train = _index(_stream(corpus, split="train", val_fraction=0.2))
    val = _index(_stream(corpus, split="val", val_fraction=0.2))
    assert sorted(train + val) == list(range(N_CELLS))
    assert 0.1 < len(val) / N_CELLS < 0.3
    assert sorted(val) == sorted(_index(_stream(corpus, split="val", val_fraction=0.2, seed=9, epoch=4)))


def test_unmasked_mode(corpus):
    b = next(iter(_ds(corpus, mask=False)))
    assert b.hidden_mask is None and b.loss_mask is None


def test_dataset_pickles_after_use(corpus):
    import pickle

    ds = _ds(corpus)
    first = next(iter(ds))  # opens memory maps
    again = next(iter(pickle.loads(pickle.dumps(ds))))
    assert torch.equal(first.values, again.values)


@pytest.mark.parametrize("world_size", [1, 2])
def test_batches_mix_shards(corpus, world_size):
    """Shards are shuffled together (mix_shards): batches hold cells of several source files, with
    each shard's share of a batch close to its share of the corpus; mix_shards=1 keeps one shard
    per batch. Coverage stays exact either way."""
    shard_of = np.repeat([0, 1, 2], [200, 123, 200])  # global cell index -> shard (fixture sizes)
    for mix, many in [(16, True), (2, True), (1, False)]:
        per_rank = [_stream(corpus, rank=r, world_size=world_size, mix_shards=mix) for r in range(world_size)]
        cells = sorted(i for batches in per_rank for i in _index(batches))
        assert cells == list(range(N_CELLS)), f"mix_shards={mix}: every cell once"
        n_sources = [len(set(shard_of[b.cell_index.numpy()])) for bs in per_rank for b in bs]
        if many:
            assert np.mean(n_sources) > 1.5, f"mix_shards={mix}: batches should mix shards"
        else:
            assert np.mean(n_sources) < 1.2  # only batches at a shard boundary hold two
    full = _index(_stream(corpus, mix_shards=16))
    first = shard_of[full[: N_CELLS // 2]]
    assert abs((first == 1).mean() - 123 / N_CELLS) < 0.08  # uniform shuffle: no shard goes first
    with pytest.raises(ValueError, match="mix_shards"):
        _ds(corpus, mix_shards=0)


def test_unexpressed_gene_targets(corpus):
    """unexpressed_ratio adds, per cell, round(ratio x loss positions) genes the cell does not
    express but its shard does: hidden, in the loss, value 0; the real tokens are unchanged and
    the stream is still the same for any number of workers."""
    from cellfm.corpus.shards import ShardReader

    plain = _stream(corpus)
    extra = _stream(corpus, unexpressed_ratio=1.0)
    _same(extra, _stream(corpus, 2, unexpressed_ratio=1.0))
    manifest = CorpusManifest.load(corpus)
    pools = [set(ShardReader(corpus / s.file).expressed_genes().tolist()) for s in manifest.shards]
    shard_of = np.repeat([0, 1, 2], [200, 123, 200])
    n_checked = 0
    for a, b in zip(plain, extra, strict=True):
        L = a.gene_ids.shape[1]
        # the real tokens as before (positions past a cell's real tokens hold its added genes)
        assert torch.equal(a.values, b.values[:, :L])
        assert torch.equal(a.hidden_mask, b.hidden_mask[:, :L] & a.token_mask)
        assert torch.equal(a.loss_mask, b.loss_mask[:, :L] & a.token_mask)
        assert torch.equal(a.gene_ids * a.token_mask, b.gene_ids[:, :L] * a.token_mask)
        for i in range(len(a)):
            n_real = int(a.token_mask[i].sum())
            n_loss = int(a.loss_mask[i].sum())
            off = b.gene_ids[i][b.token_mask[i]][n_real:]
            assert len(off) == round(1.0 * n_loss)
            real = set(a.gene_ids[i][a.token_mask[i]].tolist())
            assert not real & set(off.tolist()) and set(off.tolist()) <= pools[shard_of[int(a.cell_index[i])]]
            tail = slice(n_real, n_real + len(off))
            assert b.hidden_mask[i, tail].all() and b.loss_mask[i, tail].all()
            assert (b.values[i, tail] == 0).all()
            n_checked += len(off)
    assert n_checked > 1000
    with pytest.raises(ValueError, match="unexpressed_ratio"):
        _ds(corpus, unexpressed_ratio=1.0, mask=False)

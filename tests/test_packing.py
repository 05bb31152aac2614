"""Padding-free embedding: `cell_embedding_packed` on a `PackedBatch` equals `cell_embedding` and
the full forward's CLS on real cells (pbmc4k), with and without ST tokens and the zero embedding."""

from __future__ import annotations

import anndata as ad
import pytest
import torch

from cellfm.config import get_preset
from cellfm.contract.setup import ModelSpec, setup_cells
from cellfm.model import CellFMModule
from cellfm.model.st_tokens import st_features
from cellfm.tokenizer.packing import pack_batch, pack_cells, token_budget_batches, token_budget_groups
from cellfm.vocab import load_vocabulary

SMALL = get_preset("small").replace(dropout=0.0)


@pytest.fixture(scope="module")
def pbmc_batch(shared_data):
    """48 real PBMCs tokenized as `cellfm.embed` does, in row order (lengths mixed, so padded)."""
    a = ad.read_h5ad(shared_data / "pbmc4k_soupx" / "pbmc4k_soupx_half.h5ad")[:48].copy()
    spec = ModelSpec(SMALL, load_vocabulary(SMALL.vocabulary))
    (batch,) = setup_cells(a, spec, max_genes=2048).batches(48, sort_by_length=False)
    return batch


def make(config, seed: int = 0) -> CellFMModule:
    torch.manual_seed(seed)
    module = CellFMModule(config).eval()
    with torch.no_grad():  # non-zero adapters and zero / ST embeddings so that every weight matters
        for name, p in module.named_parameters():
            if name.endswith(("lora_b", "zero_emb", "st.emb")):
                p.normal_(0, 0.1)
    return module


def test_pack_batch_keeps_real_tokens_in_order(pbmc_batch):
    packed = pack_batch(pbmc_batch)
    lengths = pbmc_batch.token_mask.sum(1)
    assert len(packed) == len(pbmc_batch) == 48
    assert packed.n_tokens == pbmc_batch.n_tokens == int(lengths.sum())
    assert torch.equal(packed.lengths, lengths)
    assert lengths.max() > 3 * lengths.min()  # real cells of very different lengths
    for b in (0, 17, 47):
        s, e = packed.cu_seqlens[b], packed.cu_seqlens[b + 1]
        assert torch.equal(packed.gene_ids[s:e], pbmc_batch.gene_ids[b, : lengths[b]])
        assert torch.equal(packed.values[s:e], pbmc_batch.values[b, : lengths[b]])
    assert torch.equal(packed.cell_index, pbmc_batch.cell_index)


@pytest.mark.parametrize("overrides", [
    {},
    {"n_layers": 1},
    {"n_layers": 4, "lora_rank": 2},
    {"pad_zero": False, "add_zero": True},
    {"pad_zero": False},
], ids=["4-layer", "1-layer", "4-layer-lora", "add-zero", "zero-embedding"])
@pytest.mark.parametrize("st", [False, True], ids=["plain", "st-tokens"])
def test_packed_equals_padded_and_full_forward(pbmc_batch, overrides, st):
    module = make(SMALL.replace(st_tokens=st, **overrides))
    order = torch.argsort(pbmc_batch.token_mask.sum(1))
    rows = torch.cat([order[:6], order[-2:]]).sort().values  # short and long cells, row order
    batch = type(pbmc_batch)(pbmc_batch.gene_ids[rows], pbmc_batch.values[rows],
                             pbmc_batch.token_mask[rows], totals=pbmc_batch.totals[rows])
    vals = batch.values.clone()
    if not module.config.pad_zero:  # zero-valued real tokens take the zero embedding
        vals[batch.token_mask & (torch.arange(vals.shape[1]) < 5)] = 0
    st_feat = st_features(batch.totals) if st else None
    packed = pack_batch(type(batch)(batch.gene_ids, vals, batch.token_mask, totals=batch.totals))
    with torch.inference_mode():
        full = module(batch.gene_ids, vals, batch.token_mask, st_feat=st_feat).cell_emb
        padded = module.cell_embedding(batch.gene_ids, vals, batch.token_mask, st_feat=st_feat)
        fast = module.cell_embedding_packed(packed, st_feat=st_feat)
    assert fast.shape == (8, SMALL.d_model) and full.abs().mean() > 0.1
    assert (fast - padded).abs().max() <= 1e-5
    assert (fast - full).abs().max() <= 1e-5


@pytest.mark.slow
def test_80m_shape_on_real_cells(pbmc_batch):
    """The official 80M shape (random weights), short and long (capped at 2048 genes) cells in one pack."""
    module = make(get_preset("80m"))
    batch = pbmc_batch
    idx = torch.argsort(batch.token_mask.sum(1))[[0, 1, 24, 46, 47]]  # shortest, middle, longest
    ids, vals, mask = batch.gene_ids[idx], batch.values[idx], batch.token_mask[idx]
    with torch.inference_mode():
        padded = module.cell_embedding(ids, vals, mask)
        fast = module.cell_embedding_packed(pack_batch(type(batch)(ids, vals, mask)))
    assert (fast - padded).abs().max() <= 1e-5


def test_cells_of_very_different_lengths_in_one_pack(pbmc_batch):
    """A 1-gene cell, the longest real cell and a 3-gene cell: each equals its own solo pass."""
    module = make(SMALL)
    batch = pbmc_batch
    longest = int(batch.token_mask.sum(1).argmax())
    n = int(batch.token_mask[longest].sum())
    cells = [(batch.gene_ids[longest, :1], batch.values[longest, :1]),
             (batch.gene_ids[longest, :n], batch.values[longest, :n]),
             (batch.gene_ids[3, :3], batch.values[3, :3])]
    with torch.inference_mode():
        together = module.cell_embedding_packed(pack_cells([c[0] for c in cells], [c[1] for c in cells]))
        alone = torch.cat([module.cell_embedding(g[None], v[None], torch.ones(1, len(g), dtype=torch.bool))
                           for g, v in cells])
    assert n > 1000
    assert (together - alone).abs().max() <= 1e-5


def test_a_cell_without_genes_is_its_cls_alone(pbmc_batch):
    """An empty cell in a pack gives what the padded path gives for an all-padding row."""
    module = make(SMALL)
    g, v = pbmc_batch.gene_ids[0, :7], pbmc_batch.values[0, :7]
    empty = torch.zeros(0, dtype=torch.long)
    with torch.inference_mode():
        packed = pack_cells([g, empty, g], [v, empty.float(), v])
        together = module.cell_embedding_packed(packed)
        on_grid = module.cell_embedding_packed(packed, grid=True)
        padded = module.cell_embedding(torch.stack([g, torch.zeros_like(g), g]), torch.stack([v, 0 * v, v]),
                                       torch.tensor([[True] * 7, [False] * 7, [True] * 7]))
    assert (together - padded).abs().max() <= 1e-5 and (on_grid - padded).abs().max() <= 1e-5


def test_token_budget_packs_cover_every_cell_once(pbmc_batch):
    module = make(SMALL)
    packed = pack_batch(pbmc_batch)
    packs = list(token_budget_batches(pbmc_batch, max_tokens=4096))
    lengths = packed.lengths.tolist()
    assert [len(g) for g in token_budget_groups(lengths, 4096)] == [len(p) for p in packs]
    assert sum(len(p) for p in packs) == 48 and len(packs) > 1
    for p in packs:
        assert p.n_tokens + len(p) <= 4096 or len(p) == 1
    assert torch.equal(torch.cat([p.cell_index for p in packs]), pbmc_batch.cell_index)
    with torch.inference_mode():
        whole = module.cell_embedding_packed(packed)
        split = torch.cat([module.cell_embedding_packed(p) for p in packs])
    assert (whole - split).abs().max() <= 1e-5
    assert list(token_budget_groups([5, 5000, 2, 2], 100)) == [[0], [1], [2, 3]]


@pytest.mark.parametrize("st", [False, True], ids=["plain", "st-tokens"])
def test_grid_core_equals_the_per_cell_loop(pbmc_batch, st):
    """Kᵀ·V through the (cells, longest) grid (the GPU default) equals the per-cell matmuls."""
    module = make(SMALL.replace(n_layers=3, lora_rank=2, st_tokens=st))
    order = torch.argsort(pbmc_batch.token_mask.sum(1))
    rows = torch.cat([order[:5], order[-3:]]).sort().values
    batch = type(pbmc_batch)(pbmc_batch.gene_ids[rows], pbmc_batch.values[rows], pbmc_batch.token_mask[rows],
                             totals=pbmc_batch.totals[rows])
    st_feat = st_features(batch.totals) if st else None
    with torch.inference_mode():
        padded = module.cell_embedding(batch.gene_ids, batch.values, batch.token_mask, st_feat=st_feat)
        loop = module.cell_embedding_packed(pack_batch(batch), st_feat=st_feat, grid=False)
        grid = module.cell_embedding_packed(pack_batch(batch), st_feat=st_feat, grid=True)
    assert (grid - loop).abs().max() <= 1e-5 and (grid - padded).abs().max() <= 1e-5

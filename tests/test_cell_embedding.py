"""The inference-only cell-embedding path (`CellFMModule.cell_embedding`: CLS-only last layer)
equals the full forward's CLS output, and `cellfm.embed` uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_model import SMALL, make_module, random_cells

import cellfm
from cellfm.contract import setup_cells
from cellfm.embedding import embed
from cellfm.model import CellFMModule


@pytest.mark.parametrize("overrides", [
    {},
    {"n_layers": 1},
    {"n_layers": 4, "lora_rank": 2},
    {"pad_zero": False, "add_zero": True},
], ids=["2-layer", "1-layer", "4-layer-lora", "zero-embedding"])
def test_cell_embedding_equals_full_forward(overrides):
    module = make_module(SMALL.replace(**overrides))
    with torch.no_grad():  # non-trivial adapters and zero embedding so that every weight matters
        for name, p in module.named_parameters():
            if name.endswith(("lora_b", "zero_emb")):
                p.normal_(0, 0.1)
    ids, vals, mask = random_cells([5, 60, 17, 1])
    vals[2, :4] = 0  # zero-valued tokens (the zero embedding when pad_zero=False)
    with torch.inference_mode():
        full = module(ids, vals, mask).cell_emb
        fast = module.cell_embedding(ids, vals, mask)
    assert fast.shape == full.shape == (4, SMALL.d_model)
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-5)
    assert (fast - full).abs().max() < 1e-5 and full.abs().mean() > 0.1


def test_embed_uses_the_packed_path_and_matches_the_full_encoder(monkeypatch):
    """Real cells (the bundled PBMCs) through the built-in pretrained model: `cellfm.embed` runs the
    padding-free packed path, and it equals the full encoder's CLS on padded batches."""
    from cellfm.datasets import pbmc_example

    adata = pbmc_example()[:64].copy()
    model = cellfm.load("cellfm-mini")
    calls = []
    packed_path = CellFMModule.cell_embedding_packed

    def spy(self, packed, *args, **kwargs):
        calls.append(len(packed))
        return packed_path(self, packed, *args, **kwargs)

    monkeypatch.setattr(CellFMModule, "cell_embedding_packed", spy)
    fast = embed(adata, model, copy=True, progress=False).obsm["X_cellfm"]
    assert sum(calls) == adata.n_obs, "cellfm.embed did not embed every cell through the packed path"
    cells = setup_cells(adata, model)
    full = np.zeros_like(fast)
    with torch.no_grad():
        for batch in cells.batches(16):
            full[batch.cell_index.numpy()] = model.module.encode(batch.gene_ids, batch.values,
                                                                 batch.token_mask)[0][:, 0].numpy()
    assert abs(fast - full).max() < 1e-5

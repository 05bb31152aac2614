"""The inference-only cell-embedding path (`CellFMModule.cell_embedding`: CLS-only last layer)
equals the full forward's CLS output, and `cellfm.embed` uses it."""

from __future__ import annotations

import pytest
import torch
from test_model import SMALL, make_module, random_cells

import cellfm
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


def test_embed_uses_the_fast_path_and_matches_the_full_encoder(monkeypatch):
    """Real cells (the bundled PBMCs) through the built-in pretrained model."""
    from cellfm.datasets import pbmc_example

    adata = pbmc_example()[:64].copy()
    model = cellfm.load("cellfm-mini")
    calls = []
    fast_path = CellFMModule.cell_embedding

    def spy(self, *args, **kwargs):
        calls.append(args[0].shape)
        return fast_path(self, *args, **kwargs)

    monkeypatch.setattr(CellFMModule, "cell_embedding", spy)
    fast = embed(adata, model, copy=True, progress=False).obsm["X_cellfm"]
    assert calls, "cellfm.embed did not use CellFMModule.cell_embedding"
    monkeypatch.setattr(CellFMModule, "cell_embedding",
                        lambda self, ids, vals, mask, st_feat=None: self.encode(ids, vals, mask,
                                                                                st_feat=st_feat)[0][:, 0])
    full = embed(adata, model, copy=True, progress=False).obsm["X_cellfm"]
    assert abs(fast - full).max() < 1e-5

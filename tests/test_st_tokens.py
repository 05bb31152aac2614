"""The ST-token option of integration fine-tuning on real cells: library sizes reach the batch,
down-sampling follows the official `Prepare.bayes`, and fine-tuning trains the ST tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cellfm


@pytest.fixture(scope="module")
def pbmc3k_cells(shared_data):
    from cellfm.evaluation.data import load_benchmark

    adata = load_benchmark("pbmc3k", shared_data)
    rng = np.random.default_rng(0)
    return adata[np.sort(rng.choice(adata.n_obs, 48, replace=False))].copy()


def test_batches_carry_totals_and_downsampling_thins_counts(pbmc3k_cells):
    import cellfm
    from cellfm.contract import setup_cells
    from cellfm.tasks.integration_finetune import downsample

    batch = next(iter(setup_cells(pbmc3k_cells, cellfm.CellFM.from_preset("tiny")).batches(48)))
    counts = torch.expm1(batch.values.double()) * batch.totals.double()[:, None] / 1e4
    tok = batch.token_mask
    # the values are log1p(count / total * 1e4) of whole counts that add up to the total
    torch.testing.assert_close(counts[tok], counts[tok].round(), rtol=0, atol=1e-3)
    torch.testing.assert_close((counts * tok).sum(1), batch.totals.double(), rtol=1e-5, atol=0)
    values, sampled = downsample(batch.values, tok, batch.totals, np.random.default_rng(0))
    thinned = sampled < batch.totals
    assert 0.25 < thinned.float().mean() < 0.75  # about half of the cells, as the official p = 1/2
    assert torch.equal(values[~thinned], batch.values[~thinned])
    new = torch.expm1(values.double()) * sampled.double()[:, None] / 1e4
    assert torch.all(new[tok].round() >= 1) and torch.all(new[tok] <= counts[tok] + 1e-3)
    torch.testing.assert_close((new * tok).sum(1), sampled.double(), rtol=1e-5, atol=0)


def test_st_fine_tuning_trains_new_st_tokens_on_a_copy(pbmc3k_cells, tmp_path):
    from cellfm.tasks.integration_finetune import fine_tune_for_integration

    torch.manual_seed(0)
    model = cellfm.CellFM.from_preset("tiny")
    tuned = fine_tune_for_integration(pbmc3k_cells, model, epochs=1, batch_size=16, st_tokens=True,
                                      progress=False)
    assert not model.config.st_tokens and model.module.st is None
    assert tuned.config.st_tokens
    assert float(tuned.module.st.enc.a.detach().abs()) > 0  # started at 0: the ST encoder got gradients
    emb = tuned.get_cell_embeddings(pbmc3k_cells[:8])  # embedding uses CLS alone, as the tutorial
    assert emb.shape == (8, tuned.config.d_model) and np.isfinite(emb).all()
    back = cellfm.load(tuned.save(tmp_path / "tuned"))  # the ST weights survive our folder format
    assert back.config.st_tokens and torch.equal(back.module.st.emb, tuned.module.st.emb)

"""Unit tests of src/cellfm/model/: shapes, masks, invariances, LoRA, meta construction, FLOPs."""

from __future__ import annotations

import resource

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cellfm.config import ModelConfig, get_preset
from cellfm.model import CellFMModule, pretraining_loss
from cellfm.model.module import approx_flops_per_token
from cellfm.model.retention import MultiHeadRetention

SMALL = ModelConfig(n_genes=200, vocabulary="test", d_model=32, n_layers=2, n_heads=4, value_bins=16,
                    dropout=0.0)


def make_module(config: ModelConfig = SMALL, seed: int = 0) -> CellFMModule:
    torch.manual_seed(seed)
    module = CellFMModule(config).eval()
    with torch.no_grad():  # non-zero skip weight and mask embedding so that every path matters
        module.value_enc.a.fill_(0.3)
        module.value_enc.mask_emb.normal_()
    return module


def random_cells(lengths: list[int], n_genes: int = 200, seed: int = 1):
    """Right-padded batch of cells with distinct genes and log-normalised-looking values."""
    g = torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths)
    gene_ids = torch.zeros(B, L, dtype=torch.long)
    values = torch.zeros(B, L)
    token_mask = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        gene_ids[b, :n] = torch.randperm(n_genes, generator=g)[:n] + 1
        values[b, :n] = torch.rand(n, generator=g) * 4 + 0.1
        token_mask[b, :n] = True
    return gene_ids, values, token_mask


@torch.inference_mode()
def test_output_shapes_and_finiteness():
    module = make_module()
    ids, vals, mask = random_cells([7, 12, 3])
    out = module(ids, vals, mask)
    assert out.cell_emb.shape == (3, 32)
    assert out.token_emb.shape == out.gene_emb.shape == (3, 12, 32)
    assert out.gene_pred.shape == out.cell_pred.shape == (3, 12)
    assert out.gene_zero_prob is None
    for t in (out.cell_emb, out.token_emb, out.gene_pred, out.cell_pred):
        assert torch.isfinite(t).all()
    # post-norm: the CLS output is layer-normalised (mean 0, var 1 before the affine, which is identity)
    assert out.cell_emb.mean(-1).abs().max() < 1e-4
    torch.testing.assert_close(out.cell_emb.var(-1, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)


@torch.inference_mode()
def test_padding_invariance():
    """A cell gives the same outputs alone or batched (padded) beside longer cells."""
    module = make_module()
    ids, vals, mask = random_cells([5, 40, 17])
    batched = module(ids, vals, mask)
    for b, n in enumerate([5, 40, 17]):
        alone = module(ids[b : b + 1, :n], vals[b : b + 1, :n], mask[b : b + 1, :n])
        torch.testing.assert_close(batched.cell_emb[b], alone.cell_emb[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched.gene_pred[b, :n], alone.gene_pred[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched.cell_pred[b, :n], alone.cell_pred[0], atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_padding_content_is_ignored():
    """Garbage gene ids / values at padded positions must not leak into real outputs."""
    module = make_module()
    ids, vals, mask = random_cells([5, 9])
    ref = module(ids, vals, mask)
    ids2, vals2 = ids.clone(), vals.clone()
    ids2[0, 5:] = torch.arange(50, 54)
    vals2[0, 5:] = 7.0
    out = module(ids2, vals2, mask)
    torch.testing.assert_close(out.cell_emb, ref.cell_emb, atol=1e-6, rtol=1e-6)


@torch.inference_mode()
def test_cell_embedding_is_permutation_invariant():
    """Retention has no positions: the order of a cell's genes must not matter."""
    module = make_module()
    ids, vals, mask = random_cells([30])
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(3))
    a = module(ids, vals, mask)
    b = module(ids[:, perm], vals[:, perm], mask[:, perm])
    torch.testing.assert_close(a.cell_emb, b.cell_emb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.gene_pred[:, perm], b.gene_pred, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_hidden_values_do_not_leak_and_change_the_output():
    module = make_module()
    ids, vals, mask = random_cells([20])
    hidden = torch.zeros_like(mask)
    hidden[0, [2, 5, 11]] = True
    ref = module(ids, vals, mask, hidden)
    vals2 = vals.clone()
    vals2[0, [2, 5, 11]] = torch.tensor([9.0, 0.0, 3.3])
    out = module(ids, vals2, mask, hidden)  # only the hidden values differ
    torch.testing.assert_close(out.cell_emb, ref.cell_emb, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.gene_pred, ref.gene_pred, atol=1e-6, rtol=1e-6)
    visible = module(ids, vals, mask)
    assert (visible.cell_emb - ref.cell_emb).abs().max() > 1e-3  # hiding does change the input


@torch.inference_mode()
def test_gene_emb_is_the_table_row_and_padding_row_is_zero():
    module = make_module()
    ids, vals, mask = random_cells([4, 6])
    out = module(ids, vals, mask)
    torch.testing.assert_close(out.gene_emb, module.gene_emb[ids])
    assert module.gene_emb[0].abs().max() == 0
    assert module.gene_emb.shape[0] % 8 == 0 and module.gene_emb.shape[0] >= SMALL.n_genes + 1


def test_eval_is_deterministic_and_loss_backpropagates():
    cfg = SMALL.replace(dropout=0.5)
    module = make_module(cfg)
    ids, vals, mask = random_cells([10, 14])
    with torch.inference_mode():
        torch.testing.assert_close(module(ids, vals, mask).cell_emb, module(ids, vals, mask).cell_emb)
    module.train()
    from cellfm.batch import CellBatch

    loss_mask = mask.clone()
    loss_mask[:, ::2] = False
    batch = CellBatch(ids, vals, mask, hidden_mask=loss_mask, loss_mask=loss_mask)
    terms = pretraining_loss(module(ids, vals, mask, loss_mask), batch)
    assert set(terms) == {"loss", "gene_mse", "cell_mse"}
    terms["loss"].backward()
    assert module.encoder[0].attn.q_proj.weight.grad.abs().sum() > 0
    # padding row of the gene table receives no gradient
    assert module.gene_emb.grad[0].abs().max() == 0


@torch.inference_mode()
def test_lora_fresh_adapter_is_identity_and_merge_is_equivalent():
    base = make_module(SMALL)
    lora = CellFMModule(SMALL.replace(lora_rank=4)).eval()
    missing, unexpected = lora.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all("lora_" in k for k in missing)
    ids, vals, mask = random_cells([8, 13])
    ref = base(ids, vals, mask)
    torch.testing.assert_close(lora(ids, vals, mask).cell_emb, ref.cell_emb, atol=1e-6, rtol=1e-6)
    # after "training" the adapters, merging must keep outputs and drop the adapter parameters
    g = torch.Generator().manual_seed(5)
    for name, p in lora.named_parameters():
        if "lora_b" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    adapted = lora(ids, vals, mask)
    assert (adapted.cell_emb - ref.cell_emb).abs().max() > 1e-3
    lora.merge_lora()
    assert not any("lora_" in k for k in lora.state_dict())
    merged = lora(ids, vals, mask)
    torch.testing.assert_close(merged.cell_emb, adapted.cell_emb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.gene_pred, adapted.gene_pred, atol=1e-5, rtol=1e-5)


def test_800m_builds_on_meta_without_memory():
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with torch.device("meta"):
        module = CellFMModule(get_preset("800m"))
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = module.num_parameters()
    c = get_preset("800m")
    d = c.d_model
    expected = (c.gene_table_rows * d + 2 * d  # gene table, cls, zero_emb
                + c.value_bins * (1 + c.value_bins + d) + 1 + d  # value encoder
                + c.n_layers * (8 * d * d + 4 * d)  # 8 projections + 2 LayerNorms
                + d * d + d + d * d)  # value decoder, cell-wise decoder
    assert n == expected
    assert 7.5e8 < n < 8.5e8  # the "800M" model
    assert all(p.is_meta for p in module.parameters())
    assert rss_after - rss_before < 200 * 1024  # 800M fp32 parameters would be 3.2 GB


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_approx_flops_per_token_matches_counted_matmul_flops(preset):
    """The analytic FLOP count used by the benchmark agrees with torch's FLOP counter."""
    cfg = get_preset(preset).replace(n_genes=200)
    module = make_module(cfg)
    ids, vals, mask = random_cells([64, 64])
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        module(ids, vals, mask)
    n_tokens = 2 * 65  # CLS included: the encoder runs on L + 1 tokens
    counted = counter.get_total_flops() / n_tokens
    assert counted == pytest.approx(approx_flops_per_token(cfg), rel=0.05)


def test_retention_is_linear_in_sequence_length():
    """The L x L matrix is never formed: FLOPs per token do not grow with L."""
    attn = MultiHeadRetention(64, 4).eval()
    per_token = []
    for T in (256, 1024):
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            attn(torch.randn(1, T, 64), None, torch.ones(1))
        per_token.append(counter.get_total_flops() / T)
    assert per_token[0] == pytest.approx(per_token[1], rel=1e-9)

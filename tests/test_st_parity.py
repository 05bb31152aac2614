"""The ST-token model equals the authors' MindSpore `FinetuneModel` (forward, same weights).

tests/fixtures/parity/st_*.npz (scripts/make_st_parity_fixture.py): real pbmc4k cells, their real
library sizes as ST features (two cells with a down-sampled S < T), random ST weights beside the
weights of the forward-parity fixture; official outputs from MindSpore 2.10 (PyNative, CPU) for
pad_zero=True (padding, hidden values) and add_zero / pad_zero=False (zero-valued tokens); and one
integration fine-tuning step as the tutorial runs it (add_zero, ECS): loss and every gradient.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cellfm.batch import CellBatch
from cellfm.config import ModelConfig
from cellfm.model import CellFMModule
from cellfm.model.st_tokens import st_features

FIXTURE = Path(__file__).parent / "fixtures" / "parity"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_st_parity_fixture.py"


def _module(add_zero: bool) -> CellFMModule:
    z = np.load(FIXTURE / "inputs.npz")
    t = np.load(FIXTURE / "train_inputs.npz")
    s = np.load(FIXTURE / "st_inputs.npz")
    config = ModelConfig(n_genes=27855, d_model=32, n_layers=4, n_heads=4, value_bins=256, dropout=0.0,
                         pad_zero=not add_zero, add_zero=add_zero, st_tokens=True)
    module = CellFMModule(config).eval()
    files = (z, s, t) if add_zero else (z, s)
    state = {k[2:]: torch.from_numpy(f[k].astype(np.float32))
             for f in files for k in f.files if k.startswith("w:")}
    table = torch.zeros(config.gene_table_rows, config.d_model)
    table[torch.from_numpy(z["used_rows"])] = torch.from_numpy(z["gene_rows"])
    state["gene_emb"] = table
    module.load_state_dict(state, strict=True)
    return module


@pytest.mark.parametrize("mode", ["pad", "zero"])
def test_st_model_equals_official_finetune_model(mode):
    z = np.load(FIXTURE / "inputs.npz")
    t = np.load(FIXTURE / "train_inputs.npz")
    s = np.load(FIXTURE / "st_inputs.npz")
    ref = np.load(FIXTURE / "st_official.npz")
    f = torch.from_numpy
    if mode == "pad":
        ids, vals, tok, hidden = f(z["gene_ids"]), f(z["values"]), f(z["token_mask"]), f(z["hidden_mask"])
    else:
        ids, vals, hidden = f(t["zero_gene_ids"]), f(t["zero_values"]), f(t["zero_hidden"])
        tok = torch.ones_like(ids, dtype=torch.bool)
    feat = st_features(f(s["totals"]), f(s["sampled_totals"]))
    module = _module(mode == "zero")
    with torch.no_grad():
        out = module(ids, vals, tok, hidden, st_feat=feat)
        plain = module(ids, vals, tok, hidden)
    m = tok.numpy()
    np.testing.assert_allclose(out.cell_emb.numpy(), ref[f"{mode}:cell_emb"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.gene_pred.numpy()[m], ref[f"{mode}:gene_pred"][m], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.cell_pred.numpy()[m], ref[f"{mode}:cell_pred"][m], atol=1e-4, rtol=0)
    # the ST tokens change the cell embedding (they are not ignored)
    assert (out.cell_emb - plain.cell_emb).abs().max() > 1e-2


def test_st_features_follow_the_official_formula():
    feat = st_features(torch.tensor([5000.0, 1000.0]), torch.tensor([2500.0, 1000.0]))
    expected = np.log1p(np.array([[2500, 5000], [1000, 1000]]) / 1000)
    np.testing.assert_allclose(feat.numpy(), expected, rtol=1e-6)


def test_st_feat_needs_st_tokens():
    module = CellFMModule(ModelConfig(n_genes=8, d_model=8, n_layers=2, n_heads=2, value_bins=4))
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="st_tokens"):
        module(ids, torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool), st_feat=torch.ones(1, 2))


def test_integration_fine_tuning_step_equals_official():
    from test_train_parity import GRAD_RTOL, LOSS_RTOL, fixture_script

    from cellfm.tasks.integration_finetune import integration_loss

    script = fixture_script(SCRIPT)
    z = np.load(FIXTURE / "inputs.npz")
    t = np.load(FIXTURE / "train_inputs.npz")
    s = np.load(FIXTURE / "st_inputs.npz")
    ref = np.load(FIXTURE / "st_official.npz")
    f = torch.from_numpy
    ids, targets = f(t["zero_gene_ids"]), f(t["zero_values"])
    inputs = targets * f(script.DOWNSAMPLED_INPUT)[:, None]  # stands in for down-sampled values
    batch = CellBatch(ids, inputs, torch.ones_like(ids, dtype=torch.bool), f(t["zero_hidden"]),
                      f(t["zero_loss"]))
    module = _module(add_zero=True).train()
    out = module(ids, inputs, batch.token_mask, batch.hidden_mask,
                 st_feat=st_features(f(s["totals"]), f(s["sampled_totals"])))
    terms = integration_loss(out, batch, targets, ecs_threshold=0.8)
    terms["loss"].backward()
    loss_ref = float(ref["step:loss"])
    assert abs(float(terms["loss"].detach()) - loss_ref) / loss_ref <= LOSS_RTOL
    grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad).numpy()
             for n, p in module.named_parameters()}
    errs = fixture_script().gradient_errors(grads, ref, "step", z["used_rows"], script.st_official_name)
    bad = {k: v for k, v in errs.items() if not v <= GRAD_RTOL}
    assert not bad, f"gradients off by more than {GRAD_RTOL} relative: {bad}"
    assert any(k.startswith("st.") for k in errs) and len(errs) == len(grads) + 1

"""One pretraining step equals the official MindSpore CellFM: loss and every parameter gradient.

tests/fixtures/parity/train_*.npz (scripts/make_train_parity_fixture.py) hold real pbmc4k cells
with pretraining masks, the weights of the forward-parity fixture, and the loss and gradients of
the official `CellFM.construct` in training mode (MindSpore 2.10, PyNative, CPU, fp32), for the
released setup (pad_zero=True) and for add_zero=True with zero-valued tokens (pad_zero=False).
Gradients above 4,096 entries are compared through a fixed linear sketch of them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from cellfm.batch import CellBatch
from cellfm.config import ModelConfig
from cellfm.model import CellFMModule, pretraining_loss

FIXTURE = Path(__file__).parent / "fixtures" / "parity"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_train_parity_fixture.py"
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-3


def fixture_script(path: Path = SCRIPT):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _our_step(mode: str) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray], np.ndarray]:
    z = np.load(FIXTURE / "inputs.npz")
    t = np.load(FIXTURE / "train_inputs.npz")
    add_zero = mode == "zero"
    config = ModelConfig(n_genes=27855, d_model=32, n_layers=4, n_heads=4, value_bins=256, dropout=0.0,
                         pad_zero=not add_zero, add_zero=add_zero)
    module = CellFMModule(config).train()
    state = {k[2:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("w:")}
    if add_zero:
        state.update({k[2:]: torch.from_numpy(t[k]) for k in t.files if k.startswith("w:")})
    table = torch.zeros(config.gene_table_rows, config.d_model)
    table[torch.from_numpy(z["used_rows"])] = torch.from_numpy(z["gene_rows"])
    state["gene_emb"] = table
    module.load_state_dict(state, strict=True)
    f = torch.from_numpy
    if add_zero:
        ids, vals = f(t["zero_gene_ids"]), f(t["zero_values"])
        batch = CellBatch(ids, vals, torch.ones_like(ids, dtype=torch.bool), f(t["zero_hidden"]),
                          f(t["zero_loss"]))
    else:
        batch = CellBatch(f(z["gene_ids"]), f(z["values"]), f(z["token_mask"]), f(t["pad_hidden"]),
                          f(t["pad_loss"]))
    out = module(batch.gene_ids, batch.values, batch.token_mask, batch.hidden_mask)
    terms = pretraining_loss(out, batch)
    terms["loss"].backward()
    grads = {}
    for name, p in module.named_parameters():
        g = torch.zeros_like(p) if p.grad is None else p.grad
        grads[name] = g.numpy()
    return terms, grads, z["used_rows"]


def _relative_errors(mode: str) -> tuple[float, dict[str, float]]:
    ref = np.load(FIXTURE / "train_official.npz")
    terms, grads, used = _our_step(mode)
    loss_ref = float(ref[f"{mode}:loss"])
    loss_err = abs(float(terms["loss"].detach()) - loss_ref) / abs(loss_ref)
    return loss_err, fixture_script().gradient_errors(grads, ref, mode, used)


@pytest.mark.parametrize("mode", ["pad", "zero"])
def test_pretraining_step_equals_official(mode):
    loss_err, errs = _relative_errors(mode)
    assert loss_err <= LOSS_RTOL, loss_err
    bad = {k: v for k, v in errs.items() if not v <= GRAD_RTOL}
    assert not bad, f"gradients off by more than {GRAD_RTOL} relative: {bad}"
    n_params = len(list(CellFMModule(ModelConfig(n_genes=8, d_model=32, n_layers=4, n_heads=4,
                                                  value_bins=256, pad_zero=mode == "pad",
                                                  add_zero=mode == "zero")).parameters()))
    assert len(errs) == n_params + 1  # every parameter was compared

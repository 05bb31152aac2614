"""Parity with the official MindSpore CellFM.

tests/fixtures/parity holds real pbmc4k cells tokenized by our pipeline, random weights of a
small configuration (d=32, 4 layers, 4 heads, 27,855 genes) and the outputs of the official
model.py run on them in MindSpore 2.10 (PyNative, CPU; scripts/make_parity_fixture.py). Two of
the four cells carry a pretraining mask, so the first half's key masking of hidden values and
the mask embedding are covered too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cellfm.config import ModelConfig
from cellfm.model import CellFMModule

FIXTURE = Path(__file__).parent / "fixtures" / "parity"


def test_outputs_equal_official_mindspore():
    z = np.load(FIXTURE / "inputs.npz")
    ref = np.load(FIXTURE / "official_outputs.npz")
    config = ModelConfig(n_genes=27855, d_model=32, n_layers=4, n_heads=4, value_bins=256, dropout=0.0)
    module = CellFMModule(config).eval()
    state = {k[2:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("w:")}
    table = torch.zeros(config.gene_table_rows, config.d_model)
    table[torch.from_numpy(z["used_rows"])] = torch.from_numpy(z["gene_rows"])
    state["gene_emb"] = table
    module.load_state_dict(state, strict=True)
    t = torch.from_numpy
    with torch.no_grad():
        out = module(t(z["gene_ids"]), t(z["values"]), t(z["token_mask"]), t(z["hidden_mask"]))
    tok = z["token_mask"]
    assert z["hidden_mask"].sum() > 0 and (~tok).sum() > 0  # masked values and padding present
    np.testing.assert_allclose(out.cell_emb.numpy(), ref["cell_emb"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.gene_pred.numpy()[tok], ref["gene_pred"][tok], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.cell_pred.numpy()[tok], ref["cell_pred"][tok], atol=1e-4, rtol=0)

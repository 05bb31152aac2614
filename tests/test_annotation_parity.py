"""Parity of the annotation model (encoder + CellTypeHead) with the official MindSpore code.

tests/fixtures/parity/annotation_*.npz: 7 real pbmc3k cells (5 types) tokenized by our pipeline,
random weights of a small configuration (d=32, 4 encoder layers, 4 heads, 5 types), and what the
official `Backbone` + `Net` of tutorials/CellAnnotation/annotation_model.py computed from them in
MindSpore 2.10 (PyNative, CPU; scripts/make_annotation_parity_fixture.py): both logit paths, the
class-weighted training loss and the gradient of every parameter. Measured when the fixture was
made: logits max |diff| 1.9e-6, loss relative diff 7e-8, worst gradient max|diff| / max|grad| 6.6e-5
(94 tensors; the mask embedding gets no gradient in either).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cellfm.config import ModelConfig
from cellfm.model import CellFMModule
from cellfm.model.cell_type_head import CellTypeHead, annotation_loss

FIXTURE = Path(__file__).parent / "fixtures" / "parity"


def _official_name(ours: str) -> str:
    k = re.sub(r"(post_norm\d)\.weight$", r"\1.gamma", ours)
    k = re.sub(r"(post_norm\d)\.bias$", r"\1.beta", k)
    if k.startswith("enc."):
        return "extractor." + re.sub(r"^value_enc\.(w1|w3|table|a)\b", r"value_enc.value_enc.\1", k[4:])
    return k[5:]


def _load():
    z = np.load(FIXTURE / "annotation_inputs.npz")
    ref = np.load(FIXTURE / "annotation_official.npz")
    config = ModelConfig(n_genes=27855, d_model=32, n_layers=4, n_heads=4, value_bins=256, dropout=0.0)
    enc, head = CellFMModule(config), CellTypeHead(32, 4, 5, dropout=0.0)
    w = {k[2:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("w:")}
    table = torch.zeros(config.gene_table_rows, config.d_model)
    table[torch.from_numpy(z["used_rows"])] = torch.from_numpy(z["gene_rows"])
    enc.load_state_dict({"gene_emb": table, **{k[4:]: v for k, v in w.items() if k.startswith("enc.")}})
    head.load_state_dict({k[5:]: v for k, v in w.items() if k.startswith("head.")})
    return z, ref, enc, head


@pytest.fixture(scope="module")
def setup():
    return _load()


def _run(z, enc, head):
    t = torch.from_numpy
    tok = t(z["token_mask"])
    states, _ = enc.encode(t(z["gene_ids"]), t(z["values"]), tok)
    token_logits, cls_logits = head(states, tok)
    loss = annotation_loss(token_logits, cls_logits, t(z["labels"]).long(), t(z["class_weight"]))
    return token_logits, cls_logits, loss


def test_annotation_forward_equals_official(setup):
    z, ref, enc, head = setup
    assert (~z["token_mask"]).sum() > 0 and len(np.unique(z["labels"])) == 5  # padding and all types
    with torch.no_grad():
        token_logits, cls_logits, loss = _run(z, enc.eval(), head.eval())
    np.testing.assert_allclose(token_logits.numpy(), ref["token_logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(cls_logits.numpy(), ref["cls_logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(float(loss), float(ref["eval_loss"]), rtol=1e-5)


def test_annotation_training_step_gradients_equal_official(setup):
    z, ref, enc, head = setup
    enc.train(), head.train()
    enc.zero_grad(), head.zero_grad()
    _, _, loss = _run(z, enc, head)
    loss.backward()
    np.testing.assert_allclose(loss.item(), float(ref["loss"]), rtol=1e-5)
    named = [("enc." + n, p) for n, p in enc.named_parameters()] + [("head." + n, p) for n, p in
                                                                  head.named_parameters()]
    checked = set()
    for name, p in named:
        key = "g:" + _official_name(name)
        if key not in ref.files:  # decoders and zero_emb are not part of the annotation model
            assert p.grad is None or not p.grad.any(), name
            continue
        g = np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy()
        if name == "enc.gene_emb":
            g = g[z["used_rows"]]
        want = ref[key]
        scale = np.abs(want).max()
        if scale == 0:  # the mask embedding: no hidden values in annotation
            assert not g.any(), name
        else:
            assert np.abs(g - want).max() / scale <= 1e-3, (name, np.abs(g - want).max() / scale)
        checked.add(key)
    assert checked == {k for k in ref.files if k.startswith("g:")}

"""Regenerate tests/fixtures/parity/annotation_*.npz: the OFFICIAL annotation model beside ours.

    # 1. ours: random weights of encoder + head, real pbmc3k cells tokenized by our pipeline
    CELLFM_DATA_DIR=../shared/data PYTHONPATH=src python scripts/make_annotation_parity_fixture.py prepare
    # 2. official: a throw-away extract of github.com/biomed-AI/CellFM (never committed here), e.g.
    #    git -C <mirror> show HEAD:<f> > /tmp/ann_official/<f> for model.py retention.py attention.py
    #    lora.py loss_function.py config.py utils.py metrics.py data_process.py
    #    tutorials/CellAnnotation/annotation_model.py
    /work/msenv/bin/python scripts/make_annotation_parity_fixture.py official /tmp/ann_official

The official `Backbone` + `Net` (tutorials/CellAnnotation/annotation_model.py) are built with a
small configuration (d=32, 4 encoder layers, 4 heads, 27,855 genes, 5 cell types, dropout 0),
our weights are copied in under the official names, and they run in MindSpore PyNative mode on the
CPU with the official input layout (every cell padded to PAD_LEN, a CLS-inclusive attention row).
Stored: both logit paths (eval mode), the training loss with non-uniform class weights and the
gradient of every trainable parameter (`ms.value_and_grad`, before the optimizer's clipping).
tests/test_annotation_parity.py compares ours to them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "parity"
D, LAYERS, HEADS, N_GENES, PAD_LEN, N_CLS = 32, 4, 4, 27855, 1024, 5
CLASS_WEIGHT = np.array([1.0, 2.0, 0.5, 1.5, 0.8], np.float32)


def official_name(ours: str) -> str:
    """Our parameter name -> its name inside the official `Net` (encoder under `extractor.`)."""
    import re

    k = re.sub(r"(post_norm\d)\.weight$", r"\1.gamma", ours)
    k = re.sub(r"(post_norm\d)\.bias$", r"\1.beta", k)
    if k.startswith("enc."):
        k = "extractor." + re.sub(r"^value_enc\.(w1|w3|table|a)\b", r"value_enc.value_enc.\1", k[4:])
    else:
        k = k[5:]  # "head."
    return k


def prepare() -> None:
    import torch

    from cellfm.config import ModelConfig
    from cellfm.evaluation.data import load_benchmark
    from cellfm.model import CellFMModule
    from cellfm.model.cell_type_head import CellTypeHead
    from cellfm.tokenizer import iter_token_batches
    from cellfm.vocab import load_vocabulary, map_genes

    adata = load_benchmark("pbmc3k")
    types = sorted(adata.obs["classified"].astype(str).unique())[:N_CLS]
    rng = np.random.default_rng(0)
    rows = []
    for j, t in enumerate(types):  # one or two cells per type, 7 cells
        cand = np.flatnonzero(adata.obs["classified"].astype(str).to_numpy() == t)
        rows += list(rng.choice(cand, 2 if j < 2 else 1, replace=False))
    cells = adata[np.sort(rows)].copy()
    mapping = map_genes(cells.var_names, load_vocabulary("cellfm-27k"))
    batch = next(iter(iter_token_batches(cells, mapping, batch_size=len(rows), max_genes=PAD_LEN,
                                         sort_by_length=False)))
    labels = np.searchsorted(types, cells.obs["classified"].astype(str).to_numpy())

    torch.manual_seed(0)
    config = ModelConfig(n_genes=N_GENES, d_model=D, n_layers=LAYERS, n_heads=HEADS, value_bins=256,
                         dropout=0.0)
    enc, head = CellFMModule(config), CellTypeHead(D, HEADS, N_CLS, dropout=0.0)
    with torch.no_grad():  # move the parameters that start at constants off them
        enc.value_enc.a.fill_(0.3)
        for name, p in [*enc.named_parameters(), *head.named_parameters()]:
            if "post_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    state = {"enc." + k: v.numpy() for k, v in enc.state_dict().items()}
    state.update({"head." + k: v.numpy() for k, v in head.state_dict().items()})
    used = np.unique(batch.gene_ids.numpy())
    gene_rows = state.pop("enc.gene_emb")[used]
    FIXTURE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        FIXTURE / "annotation_inputs.npz", gene_ids=batch.gene_ids.numpy(), values=batch.values.numpy(),
        token_mask=batch.token_mask.numpy(), labels=labels, class_weight=CLASS_WEIGHT, used_rows=used,
        gene_rows=gene_rows, **{"w:" + k: v for k, v in state.items()},
    )
    print("wrote", FIXTURE / "annotation_inputs.npz", "cells", batch.token_mask.sum(1).tolist())


def official(repo: str) -> None:
    import mindspore as ms

    sys.path[:0] = [repo, str(Path(repo) / "tutorials" / "CellAnnotation")]
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    from annotation_model import Backbone, Net  # noqa: E402  (the official repo)
    from config import Config  # noqa: E402

    z = np.load(FIXTURE / "annotation_inputs.npz")
    cfg = Config()
    cfg.enc_dims, cfg.enc_nlayers, cfg.enc_num_heads, cfg.num_cls = D, LAYERS, HEADS, N_CLS
    cfg.recompute, cfg.dropout, cfg.enc_dropout, cfg.lora = False, 0.0, 0.0, 0
    net = Net(Backbone(N_GENES, cfg), cfg, cls_weight=z["class_weight"])
    table = np.zeros((N_GENES + 1 + (-N_GENES - 1) % 8, D), np.float32)
    table[z["used_rows"]] = z["gene_rows"]
    values = {"extractor.gene_emb": table}
    values.update({official_name(k[2:]): z[k] for k in z.files if k.startswith("w:")})
    names = {}
    for name, p in net.parameters_and_names():
        assert name in values, f"official parameter without a value: {name}"
        p.set_data(ms.Tensor(values[name]))
        names[id(p)] = name

    ids, vals, tok, labels = z["gene_ids"], z["values"], z["token_mask"], z["labels"]
    B, L = ids.shape
    pad = PAD_LEN - L  # the official pipeline pads every cell to pad_len
    t = ms.Tensor
    expr = t(np.pad(vals, ((0, 0), (0, pad))).astype(np.float32))
    gene = t(np.pad(ids, ((0, 0), (0, pad))).astype(np.int32))
    zero_idx = t(np.pad(np.concatenate([np.ones((B, 1)), tok], 1), ((0, 0), (0, pad))).astype(np.float32))
    label = t(labels.astype(np.int32))
    net.set_train(False)
    pred1, pred2 = net.forward(expr, gene, zero_idx)
    eval_loss = net(expr, gene, zero_idx, label)[0]
    net.set_train(True)
    params = net.trainable_params()
    loss, grads = ms.value_and_grad(net, None, params)(expr, gene, zero_idx, label)
    out = {"g:" + names[id(p)]: g.asnumpy() for p, g in zip(params, grads, strict=True)}
    out["g:extractor.gene_emb"] = out["g:extractor.gene_emb"][z["used_rows"]]
    np.savez_compressed(
        FIXTURE / "annotation_official.npz", token_logits=pred1.asnumpy(), cls_logits=pred2.asnumpy(),
        eval_loss=eval_loss.asnumpy(), loss=loss.asnumpy(), mindspore_version=np.array(ms.__version__), **out,
    )
    print("wrote", FIXTURE / "annotation_official.npz", "loss", float(loss.asnumpy()), "grads", len(grads),
          "mindspore", ms.__version__)


if __name__ == "__main__":
    {"prepare": lambda: prepare(), "official": lambda: official(sys.argv[2])}[sys.argv[1]]()

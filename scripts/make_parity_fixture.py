"""Regenerate tests/fixtures/parity/: run the OFFICIAL MindSpore CellFM beside ours.

    python -m venv /tmp/msenv && /tmp/msenv/bin/pip install mindspore "numpy<2"   # 2.10.0 was used
    # 1. ours: write weights + real tokenized cells
    python scripts/make_parity_fixture.py prepare ../shared/data/pbmc4k_soupx/pbmc4k_soupx_half.h5ad
    # 2. official (a local clone of github.com/biomed-AI/CellFM, never committed here)
    /tmp/msenv/bin/python scripts/make_parity_fixture.py official /path/to/CellFM

The official model is built with a small random configuration (d=32, 4 layers, 4 heads,
27,855 genes, pad_zero=True as in the released pipeline), our weights are copied into it under
the official names, and it runs in PyNative mode on the CPU on the official input layout
(values with an unmask channel, a CLS-inclusive attention row, padding to the full length).
Only its outputs are stored; tests/test_parity.py compares our model to them.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "parity"
D, LAYERS, HEADS, N_GENES, PAD_LEN = 32, 4, 4, 27855, 1024


def official_name(k: str) -> str:
    k = re.sub(r"^value_enc\.(w1|w3|table|a)\b", r"value_enc.value_enc.\1", k)
    k = re.sub(r"(post_norm\d)\.weight$", r"\1.gamma", k)
    return re.sub(r"(post_norm\d)\.bias$", r"\1.beta", k)


def prepare(h5ad: str) -> None:
    import anndata as ad
    import torch

    from cellfm.config import ModelConfig
    from cellfm.model import CellFMModule
    from cellfm.tokenizer import iter_token_batches, mask_values
    from cellfm.vocab import load_vocabulary, map_genes

    adata = ad.read_h5ad(h5ad)[:40].copy()
    mapping = map_genes(adata.var_names, load_vocabulary("cellfm-27k"))
    cells = [b for b in iter_token_batches(adata, mapping, batch_size=40, max_genes=PAD_LEN)][0]
    pick = [0, 10, 20, 39]  # short to long cells
    ids, vals, tok = cells.gene_ids[pick], cells.values[pick], cells.token_mask[pick]
    rng = np.random.default_rng(0)
    hidden = np.zeros(ids.shape, bool)
    for j in (2, 3):  # two cells carry a pretraining mask
        n = int(tok[j].sum())
        hidden[j, :n] = mask_values(n, rng)[0]
    torch.manual_seed(0)
    config = ModelConfig(n_genes=N_GENES, d_model=D, n_layers=LAYERS, n_heads=HEADS, value_bins=256,
                         dropout=0.0)
    module = CellFMModule(config)
    with torch.no_grad():
        module.value_enc.a.fill_(0.3)
        module.value_enc.mask_emb.normal_(0, 0.5)
    used = np.unique(ids.numpy())
    state = {k: v.numpy() for k, v in module.state_dict().items()}
    gene_rows = state.pop("gene_emb")[used]
    FIXTURE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(FIXTURE / "inputs.npz", gene_ids=ids.numpy(), values=vals.numpy(),
                        token_mask=tok.numpy(), hidden_mask=hidden, used_rows=used, gene_rows=gene_rows,
                        **{"w:" + k: v for k, v in state.items()})
    print("wrote", FIXTURE / "inputs.npz")


def official(repo: str) -> None:
    import mindspore as ms

    sys.path.insert(0, repo)
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    from config import Config  # noqa: E402  (the official repo)
    from model import CellFM  # noqa: E402

    z = np.load(FIXTURE / "inputs.npz")
    cfg = Config()
    cfg.enc_dims, cfg.enc_nlayers, cfg.enc_num_heads = D, LAYERS, HEADS
    cfg.recompute, cfg.dropout, cfg.enc_dropout, cfg.lora = False, 0.0, 0.0, 0
    cfg.add_zero, cfg.pad_zero, cfg.label = False, True, False
    net = CellFM(N_GENES, cfg)
    net.set_train(False)
    table = np.zeros((N_GENES + 1 + (-N_GENES - 1) % 8, D), np.float32)
    table[z["used_rows"]] = z["gene_rows"]
    params = {"gene_emb": table}
    params.update({official_name(k[2:]): z[k] for k in z.files if k.startswith("w:")})
    own = {p.name for p in net.get_parameters()}
    missing = own - set(params)
    assert not missing, f"official parameters without a value: {sorted(missing)}"
    ms.load_param_into_net(net, {k: ms.Parameter(ms.Tensor(v), name=k)
                                 for k, v in params.items() if k in own})

    ids, vals, tok, hidden = z["gene_ids"], z["values"], z["token_mask"], z["hidden_mask"]
    B, L = ids.shape
    pad = PAD_LEN - L  # the official pipeline pads every cell to pad_len
    ids_p = np.pad(ids, ((0, 0), (0, pad))).astype(np.int32)
    unmask = (tok & ~hidden).astype(np.float32)
    expr = np.stack([unmask, np.where(hidden, 0, vals)], -1).astype(np.float32)  # official Prepare.mask
    expr = np.pad(expr, ((0, 0), (0, pad), (0, 0)))
    zero_idx = np.pad(np.concatenate([np.ones((B, 1)), tok], 1), ((0, 0), (0, pad))).astype(np.float32)
    t = ms.Tensor
    emb, gene_emb, cls = net.forward(t(expr), t(ids_p), t(zero_idx))
    gw, cw = net(t(vals.astype(np.float32)), t(expr), t(ids_p), t(np.zeros_like(zero_idx[:, 1:])),
                 t(zero_idx))
    np.savez_compressed(FIXTURE / "official_outputs.npz", cell_emb=cls.asnumpy(),
                        gene_pred=gw.asnumpy()[:, :L], cell_pred=cw.asnumpy()[:, :L],
                        mindspore_version=np.array(ms.__version__))
    print("wrote", FIXTURE / "official_outputs.npz", "mindspore", ms.__version__)


if __name__ == "__main__":
    {"prepare": prepare, "official": official}[sys.argv[1]](sys.argv[2])

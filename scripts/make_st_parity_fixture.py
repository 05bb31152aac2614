"""Regenerate tests/fixtures/parity/st_*.npz: the authors' ST-token model (`FinetuneModel`,
tutorials/BatchIntegration/finetune_intergration_model.py, MindSpore) beside ours.

    # 1. ours: the cells' library sizes and random ST weights
    python scripts/make_st_parity_fixture.py prepare ../shared/data/pbmc4k_soupx/pbmc4k_soupx_half.h5ad
    # 2. official (a local clone of github.com/biomed-AI/CellFM, never committed here)
    /work/msenv/bin/python scripts/make_st_parity_fixture.py official /path/to/CellFM

Weights and cells are those of the forward and training-step fixtures (inputs.npz,
train_inputs.npz) plus random ST weights (`ST_emb`, `ST_enc`). ST features are
log1p([S, T] / 1000) from the cells' real totals T; S = T for two cells and a down-sampled S < T
for the other two (as the official fine-tuning pipeline draws). Two layouts: "pad" (pad_zero=True,
two cells with hidden values, padding) and "zero" (add_zero, pad_zero=False: the zero-token batch
of the training-step fixture, with hidden values). The official model's `forward` runs in PyNative
on the CPU; we store its CLS output and both decoders' predictions.

Also one integration fine-tuning step as the tutorial runs it (add_zero, pad_zero=False, ECS 0.8,
training mode): loss and every gradient (`value_and_grad`, stored as in the training-step fixture)
on the zero-token batch, the encoder fed values scaled by `DOWNSAMPLED_INPUT` (standing in for the
down-sampled values) and the loss aimed at the original ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_train_parity_fixture import official_name, pack_gradient  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "parity"
D, LAYERS, HEADS, N_GENES, PAD_LEN = 32, 4, 4, 27855, 1040
SAMPLED_FRACTION = np.array([1.0, 0.5, 1.0, 0.7], np.float32)  # S / T per cell
DOWNSAMPLED_INPUT = np.array([1.0, 0.9, 1.0, 0.8], np.float32)  # encoder input / target values per cell


def st_official_name(k: str) -> str:
    """Our ST names -> official: st.emb -> ST_emb, st.enc.* -> ST_enc.*."""
    if k == "st.emb":
        return "ST_emb"
    if k.startswith("st.enc."):
        return "ST_enc." + k[len("st.enc."):]
    return official_name(k)


def prepare(h5ad: str) -> None:
    import anndata as ad
    import torch

    from cellfm.model.st_tokens import STTokens
    from cellfm.tokenizer import iter_token_batches
    from cellfm.vocab import load_vocabulary, map_genes

    z = np.load(FIXTURE / "inputs.npz")
    adata = ad.read_h5ad(h5ad)[:40].copy()
    mapping = map_genes(adata.var_names, load_vocabulary("cellfm-27k"))
    cells = next(iter(iter_token_batches(adata, mapping, batch_size=40, max_genes=1024)))
    pick = [0, 10, 20, 39]  # the cells of inputs.npz (scripts/make_parity_fixture.py)
    assert np.array_equal(cells.gene_ids[pick].numpy(), z["gene_ids"]), "not the cells of inputs.npz"
    totals = cells.totals[pick].numpy()
    torch.manual_seed(2)
    st = STTokens(D, 256)
    with torch.no_grad():
        st.emb.normal_(0, 0.5)
        st.enc.a.fill_(0.2)
    # stored as float16 (half the file; both sides read the same numbers back as float32)
    np.savez_compressed(FIXTURE / "st_inputs.npz", totals=totals, sampled_totals=totals * SAMPLED_FRACTION,
                        **{"w:st." + k: v.numpy().astype(np.float16) for k, v in st.state_dict().items()})
    print("wrote", FIXTURE / "st_inputs.npz", "totals", totals)


def official(repo: str) -> None:
    import mindspore as ms

    sys.path.insert(0, repo)
    sys.path.insert(0, str(Path(repo) / "tutorials" / "BatchIntegration"))
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    import mindspore.common.api as ms_api

    if not hasattr(ms_api, "ms_function"):  # imported (unused) by the tutorial; gone in MindSpore 2.3+
        ms_api.ms_function = ms.jit
    from config import Config  # noqa: E402  (the official repo)
    from finetune_intergration_model import FinetuneModel  # noqa: E402

    z = np.load(FIXTURE / "inputs.npz")
    t = np.load(FIXTURE / "train_inputs.npz")
    s = np.load(FIXTURE / "st_inputs.npz")
    table = np.zeros((N_GENES + 1 + (-N_GENES - 1) % 8, D), np.float32)
    table[z["used_rows"]] = z["gene_rows"]
    weights = {"gene_emb": table}
    for f in (z, s):
        weights.update({st_official_name(k[2:]): f[k].astype(np.float32)
                        for k in f.files if k.startswith("w:")})
    st_feat = np.log1p(np.stack([s["sampled_totals"], s["totals"]], -1) / 1000).astype(np.float32)

    def build(add_zero: bool, ecs: bool = False):
        cfg = Config()
        cfg.enc_dims, cfg.enc_nlayers, cfg.enc_num_heads = D, LAYERS, HEADS
        cfg.recompute, cfg.dropout, cfg.enc_dropout, cfg.lora = False, 0.0, 0.0, 0
        cfg.add_zero, cfg.pad_zero, cfg.label, cfg.ecs = add_zero, not add_zero, False, ecs
        net = FinetuneModel(N_GENES, cfg)
        w = dict(weights)
        if add_zero:
            w.update({official_name(k[2:]): t[k] for k in t.files if k.startswith("w:")})
        own = {p.name for p in net.get_parameters()}
        missing, unused = own - set(w), {k for k in w if k not in own}
        assert not missing and not unused, (sorted(missing), sorted(unused))
        ms.load_param_into_net(net, {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in w.items()})
        net.set_train(False)
        return net

    def run(net, expr, ids, zero_idx, n_tokens):
        T = ms.Tensor
        tokens, gene_emb, cls = net.forward(T(expr), T(ids), T(st_feat), T(zero_idx))
        gw = net.value_dec(tokens)
        gw = gw[0] if isinstance(gw, tuple) else gw
        cw = net.cellwise_dec(cls, gene_emb)
        cw = cw[0] if isinstance(cw, tuple) else cw
        return cls.asnumpy(), gw.asnumpy()[:, :n_tokens], cw.asnumpy()[:, :n_tokens]

    out = {"mindspore_version": np.array(ms.__version__)}
    ids, vals, tok, hidden = z["gene_ids"], z["values"], z["token_mask"], z["hidden_mask"]
    B, L = ids.shape
    pad = ((0, 0), (0, PAD_LEN - L))
    expr = np.stack([tok & ~hidden, np.where(hidden, 0, vals)], -1).astype(np.float32)
    expr = np.pad(expr, pad + ((0, 0),))
    zero_idx = np.pad(np.concatenate([np.ones((B, 1)), tok], 1), pad).astype(np.float32)
    out["pad:cell_emb"], out["pad:gene_pred"], out["pad:cell_pred"] = run(
        build(False), expr, np.pad(ids, pad).astype(np.int32), zero_idx, L)
    ids, vals, hidden = t["zero_gene_ids"], t["zero_values"], t["zero_hidden"]
    expr = np.stack([~hidden, np.where(hidden, 0, vals)], -1).astype(np.float32)
    out["zero:cell_emb"], out["zero:gene_pred"], out["zero:cell_pred"] = run(
        build(True), expr, ids.astype(np.int32), (vals != 0).astype(np.float32), ids.shape[1])
    # one integration fine-tuning step
    net = build(True, ecs=True)
    net.set_train(True)
    dw = vals * DOWNSAMPLED_INPUT[:, None]
    expr = np.stack([~hidden, np.where(hidden, 0, dw)], -1).astype(np.float32)
    params = net.trainable_params()
    step = ms.value_and_grad(net, grad_position=None, weights=params)
    T = ms.Tensor
    loss, grads = step(T(vals.astype(np.float32)), T(expr), T(st_feat), T(ids.astype(np.int32)),
                       T(t["zero_loss"].astype(np.float32)), T((vals != 0).astype(np.float32)))
    out["step:loss"] = np.array(float(loss.asnumpy()))
    for p, g in zip(params, grads, strict=True):
        out.update({f"step:{k}": v for k, v in pack_gradient(p.name, g.asnumpy(), z["used_rows"]).items()})
    np.savez_compressed(FIXTURE / "st_official.npz", **out)
    print("wrote", FIXTURE / "st_official.npz", "mindspore", ms.__version__)


if __name__ == "__main__":
    {"prepare": prepare, "official": official}[sys.argv[1]](sys.argv[2])

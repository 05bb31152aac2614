"""Regenerate tests/fixtures/parity/train_*.npz: one pretraining step of the OFFICIAL MindSpore
CellFM beside ours (loss and every parameter gradient).

    # 1. ours: masks and batches from the cells and weights of tests/fixtures/parity/inputs.npz
    python scripts/make_train_parity_fixture.py prepare
    # 2. official (a local clone of github.com/biomed-AI/CellFM, never committed here)
    /work/msenv/bin/python scripts/make_train_parity_fixture.py official /path/to/CellFM

Two steps, both on the weights of the forward-parity fixture (d=32, 4 layers, 4 heads, 27,855
genes, dropout 0) and on real pbmc4k cells:

- "pad": the released pretraining setup (pad_zero=True, add_zero=False): the 4 cells with
  official `Prepare.mask` masks (20 % of the expressed genes in the loss, 80 % of those hidden),
  padded to the full length as the official pipeline does;
- "zero": add_zero=True, pad_zero=False: each cell is 512 of its expressed genes plus 256 genes
  it does not express (value 0, taken from the genes the other cells express, so their gene-table
  rows are in the fixture), no padding, masks drawn the same way on both parts; the zero heads
  and the zero embedding get random values.

The official `CellFM.construct` runs in training mode (PyNative, CPU, fp32) and its gradients
come from `mindspore.value_and_grad`. Gradients of tensors above 4,096 entries are stored as a
count sketch (`sketch`, a fixed linear map to 512 numbers) plus their norm, to keep the fixture
small; the gene table's gradient is stored for the used rows only, with the norm of the whole
table's gradient (which shows that no other row got any).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "parity"
D, LAYERS, HEADS, N_GENES, PAD_LEN = 32, 4, 4, 27855, 1040
N_EXPRESSED, N_ZERO = 512, 256  # tokens per cell in the add_zero batch
FULL_MAX = 4096  # gradients with more entries are sketched
BUCKETS = 512


def sketch(g: np.ndarray) -> np.ndarray:
    """Count sketch of `g`: every entry, with a +-1 sign, summed into one of 512 buckets chosen by
    a fixed integer hash (splitmix64) of its flat index. Linear, so the sketch of a difference is
    the difference of the sketches, and its relative size tracks the relative error of `g`."""
    i = np.arange(g.size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = i + np.uint64(0x9E3779B97F4A7C15)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(31))
    bucket = (h % np.uint64(BUCKETS)).astype(np.int64)
    sign = np.where((h >> np.uint64(40)) & np.uint64(1), 1.0, -1.0)
    return np.bincount(bucket, weights=sign * g.astype(np.float64).ravel(), minlength=BUCKETS)


def pack_gradient(name: str, g: np.ndarray, used_rows: np.ndarray) -> dict[str, np.ndarray]:
    """What the fixture keeps of one gradient (see the module docstring)."""
    out = {f"norm:{name}": np.array(np.linalg.norm(g.astype(np.float64)))}
    if name == "gene_emb":
        g = g[used_rows]
        out["norm:gene_emb_used"] = np.array(np.linalg.norm(g.astype(np.float64)))
    if g.size <= FULL_MAX:
        out[f"grad:{name}"] = g.astype(np.float32)
    else:
        out[f"sketch:{name}"] = sketch(g)
    return out


def gradient_errors(ours: dict[str, np.ndarray], ref, prefix: str, used_rows: np.ndarray,
                    to_official=None) -> dict[str, float]:
    """Relative error of each of our gradients (our names) against the packed official ones in
    `ref` under `prefix`: ||ours - theirs|| / ||theirs|| on the full tensor or its sketch, or the
    relative error of the norm if larger; the max |entry| where the official gradient is zero."""
    to_official = to_official or official_name
    errs = {}
    for name, g in ours.items():
        off = to_official(name)
        packed = pack_gradient(off, g, used_rows)
        norm_ref = float(ref[f"{prefix}:norm:{off}"])
        if norm_ref == 0:  # e.g. the zero embedding under pad_zero: no gradient on either side
            errs[name] = float(np.abs(g).max())
            continue
        key = f"grad:{off}" if f"{prefix}:grad:{off}" in ref.files else f"sketch:{off}"
        mine, theirs = np.asarray(packed[key], np.float64), np.asarray(ref[f"{prefix}:{key}"], np.float64)
        errs[name] = max(float(np.linalg.norm(mine - theirs) / np.linalg.norm(theirs)),
                         abs(float(packed[f"norm:{off}"]) - norm_ref) / norm_ref)
    # the official gene table's gradient lives in the used rows only, as ours does
    full, used = float(ref[f"{prefix}:norm:gene_emb"]), float(ref[f"{prefix}:norm:gene_emb_used"])
    errs["gene_emb (rows outside the batch)"] = abs(full - used) / full
    return errs


def official_name(k: str) -> str:
    k = re.sub(r"^value_enc\.(w1|w3|table|a)\b", r"value_enc.value_enc.\1", k)
    k = re.sub(r"(post_norm\d)\.weight$", r"\1.gamma", k)
    return re.sub(r"(post_norm\d)\.bias$", r"\1.beta", k)


def prepare() -> None:
    import torch

    from cellfm.config import ModelConfig
    from cellfm.model import CellFMModule
    from cellfm.tokenizer import mask_values

    z = np.load(FIXTURE / "inputs.npz")
    ids, vals, tok = z["gene_ids"], z["values"], z["token_mask"]
    rng = np.random.default_rng(1)
    B, L = ids.shape
    # "pad": every cell with the official pretraining masks
    pad_hidden, pad_loss = np.zeros((B, L), bool), np.zeros((B, L), bool)
    for i in range(B):
        n = int(tok[i].sum())
        pad_hidden[i, :n], pad_loss[i, :n] = mask_values(n, rng)
    # "zero": expressed genes + genes the cell does not express, no padding
    used = z["used_rows"]
    z_ids = np.zeros((B, N_EXPRESSED + N_ZERO), np.int64)
    z_vals = np.zeros(z_ids.shape, np.float32)
    z_hidden, z_loss = np.zeros(z_ids.shape, bool), np.zeros(z_ids.shape, bool)
    for i in range(B):
        n = int(tok[i].sum())
        keep = np.sort(rng.choice(n, N_EXPRESSED, replace=False))
        absent = np.setdiff1d(used, ids[i, :n])
        zeros = rng.choice(absent, N_ZERO, replace=False)
        z_ids[i] = np.concatenate([ids[i, keep], zeros])
        z_vals[i, :N_EXPRESSED] = vals[i, keep]
        for start, m in ((0, N_EXPRESSED), (N_EXPRESSED, N_ZERO)):
            z_hidden[i, start:start + m], z_loss[i, start:start + m] = mask_values(m, rng)
    # zero heads and zero embedding: random values, as an add_zero model has them
    torch.manual_seed(1)
    config = ModelConfig(n_genes=N_GENES, d_model=D, n_layers=LAYERS, n_heads=HEADS, value_bins=256,
                         dropout=0.0, pad_zero=False, add_zero=True)
    module = CellFMModule(config)
    extra = {k: v.numpy() for k, v in module.state_dict().items() if "zero_logit" in k}
    extra["zero_emb"] = rng.normal(0, 0.5, (1, 1, D)).astype(np.float32)
    np.savez_compressed(FIXTURE / "train_inputs.npz", pad_hidden=pad_hidden, pad_loss=pad_loss,
                        zero_gene_ids=z_ids, zero_values=z_vals, zero_hidden=z_hidden, zero_loss=z_loss,
                        **{"w:" + k: v for k, v in extra.items()})
    print("wrote", FIXTURE / "train_inputs.npz")


def _official_step(net, ms, inputs: list[np.ndarray]):
    params = net.trainable_params()
    step = ms.value_and_grad(net, grad_position=None, weights=params)
    loss, grads = step(*[ms.Tensor(x) for x in inputs])
    return float(loss.asnumpy()), {p.name: g.asnumpy() for p, g in zip(params, grads, strict=True)}


def official(repo: str) -> None:
    import mindspore as ms

    sys.path.insert(0, repo)
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    from config import Config  # noqa: E402  (the official repo)
    from model import CellFM  # noqa: E402

    z = np.load(FIXTURE / "inputs.npz")
    t = np.load(FIXTURE / "train_inputs.npz")
    used = z["used_rows"]
    table = np.zeros((N_GENES + 1 + (-N_GENES - 1) % 8, D), np.float32)
    table[used] = z["gene_rows"]
    weights = {"gene_emb": table}
    weights.update({official_name(k[2:]): z[k] for k in z.files if k.startswith("w:")})

    def build(add_zero: bool):
        cfg = Config()
        cfg.enc_dims, cfg.enc_nlayers, cfg.enc_num_heads = D, LAYERS, HEADS
        cfg.recompute, cfg.dropout, cfg.enc_dropout, cfg.lora = False, 0.0, 0.0, 0
        cfg.add_zero, cfg.pad_zero, cfg.label = add_zero, not add_zero, False
        net = CellFM(N_GENES, cfg)
        w = dict(weights)
        if add_zero:
            w.update({official_name(k[2:]): t[k] for k in t.files if k.startswith("w:")})
        own = {p.name for p in net.get_parameters()}
        missing, unused = own - set(w), {k for k in w if k not in own}
        assert not missing and not unused, (sorted(missing), sorted(unused))
        ms.load_param_into_net(net, {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in w.items()})
        net.set_train(True)
        return net

    out: dict[str, np.ndarray] = {"mindspore_version": np.array(ms.__version__)}
    # "pad": the official layout, values with an unmask channel, padded to PAD_LEN, CLS in zero_idx
    ids, vals, tok = z["gene_ids"], z["values"], z["token_mask"]
    hidden, loss_pos = t["pad_hidden"], t["pad_loss"]
    B, L = ids.shape
    pad = ((0, 0), (0, PAD_LEN - L))
    expr = np.stack([(tok & ~hidden), np.where(hidden, 0, vals)], -1).astype(np.float32)
    zero_idx = np.pad(np.concatenate([np.ones((B, 1)), tok], 1), pad).astype(np.float32)
    inputs = [np.pad(vals, pad).astype(np.float32), np.pad(expr, pad + ((0, 0),)),
              np.pad(ids, pad).astype(np.int32), np.pad(loss_pos, pad).astype(np.float32), zero_idx]
    loss, grads = _official_step(build(False), ms, inputs)
    out["pad:loss"] = np.array(loss)
    for name, g in grads.items():
        out.update({f"pad:{k}": v for k, v in pack_gradient(name, g, used).items()})
    # "zero": pad_zero=False layout, zero_idx = which tokens are expressed (no CLS entry)
    ids, vals = t["zero_gene_ids"], t["zero_values"]
    hidden, loss_pos = t["zero_hidden"], t["zero_loss"]
    expr = np.stack([~hidden, np.where(hidden, 0, vals)], -1).astype(np.float32)
    inputs = [vals.astype(np.float32), expr, ids.astype(np.int32), loss_pos.astype(np.float32),
              (vals != 0).astype(np.float32)]
    loss, grads = _official_step(build(True), ms, inputs)
    out["zero:loss"] = np.array(loss)
    for name, g in grads.items():
        out.update({f"zero:{k}": v for k, v in pack_gradient(name, g, used).items()})
    np.savez_compressed(FIXTURE / "train_official.npz", **out)
    print("wrote", FIXTURE / "train_official.npz", "mindspore", ms.__version__,
          "losses", out["pad:loss"], out["zero:loss"])


if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        prepare()
    else:
        official(sys.argv[2])

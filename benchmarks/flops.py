"""FLOPs of CellFM from the layer math, checked against torch's FLOP counter on real cells, and the
expressed-gene distribution of real cells (docs/scaling.md).

Matmul FLOPs only (2 per multiply-add; norms, softmax and activations are not counted, as in MFU).
d = d_model, hd = head dim, b = value bins, a cell of L expressed genes runs T = L + 1 tokens (CLS):

  value encoder   per gene   2b + 2b^2 + 2bd        (1->b, b->b, b->d)
  encoder layer   per token  16 d^2 + 4 d hd        (q k v u o + GLU u v o: 8 d x d; K^T V and Q (K^T V))
  decoders        per gene   4 d^2 + 4 d            (value decoder d->d->1; cell-wise: map d->d, dot with CLS)
  forward (pretraining) = L * VE + T * n_layers * layer + L * decoders; training step = 3 x forward
  embedding (`cell_embedding`, CLS-only last layer) = L * VE + T * (n_layers - 1) * layer
            + T * (4 d^2 + 2 d hd) [K, V and K^T V of the last layer] + 12 d^2 + 2 d hd [its CLS row]

    python benchmarks/flops.py --data-dir ../shared/data     # prints formula vs counted, gene stats
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from real_cells import data_dir
from torch.utils.flop_counter import FlopCounterMode

FULL_TRANSCRIPTOME = ["pbmc4k_soupx/pbmc4k_soupx_half.h5ad",
                      "celltypist_sample/celltypist_sample_559cells.h5ad"]
H100_BF16_DENSE = 989e12  # FLOP/s, NVIDIA H100 SXM datasheet (dense, no sparsity)


def terms(cfg) -> dict[str, float]:
    d, hd, b = cfg.d_model, cfg.head_dim, cfg.value_bins
    return {"value_enc": 2 * b + 2 * b * b + 2 * b * d, "layer": 16 * d * d + 4 * d * hd,
            "decoders": 4 * d * d + 4 * d, "last_kv": 4 * d * d + 2 * d * hd,
            "cls_row": 12 * d * d + 2 * d * hd}


def forward_flops(cfg, n_genes: float) -> float:
    """Pretraining forward FLOPs of one cell with `n_genes` expressed genes."""
    t = terms(cfg)
    return n_genes * t["value_enc"] + (n_genes + 1) * cfg.n_layers * t["layer"] + n_genes * t["decoders"]


def train_flops(cfg, n_genes: float) -> float:
    return 3 * forward_flops(cfg, n_genes)


def embed_flops(cfg, n_genes: float) -> float:
    """`cell_embedding` / `cell_embedding_packed` FLOPs of one cell (no padding)."""
    t = terms(cfg)
    return (n_genes * t["value_enc"] + (n_genes + 1) * ((cfg.n_layers - 1) * t["layer"] + t["last_kv"])
            + t["cls_row"])


def real_cells(path: Path, vocabulary: str, n: int | None = None, seed: int = 0) -> list:
    """Tokenized real cells [(row, ids, values, total)] as `cellfm.embed` makes them (max 2048)."""
    import anndata as ad

    from cellfm.tokenizer import tokenize_chunk
    from cellfm.vocab import load_vocabulary, map_genes

    a = ad.read_h5ad(path)
    if n:
        a = a[:n].copy()
    m = map_genes(a.var_names, load_vocabulary(vocabulary))
    import scipy.sparse as sp

    ids = np.asarray(m.token_ids, dtype=np.int64)
    return tokenize_chunk(sp.csr_matrix(a.X), ids, 0, max_genes=2048, seed=seed)


def gene_stats(data: Path) -> np.ndarray:
    """Prints the distribution per file and vocabulary; returns min(genes, 2048) of every cell
    (27k vocabulary), the token counts the plan uses."""
    import anndata as ad
    import scipy.sparse as sp

    from cellfm.vocab import load_vocabulary, map_genes

    print("expressed genes per cell (in the vocabulary; tokens = min(genes, 2048) + CLS)")
    print(f"{'file':52s} {'vocab':10s} {'cells':>6s} {'p10':>5s} {'median':>6s} {'mean':>6s} {'p90':>5s} "
          f"{'max':>5s} {'>2048':>6s} {'mean capped':>11s}")
    tokens = []
    for rel in FULL_TRANSCRIPTOME:
        a = ad.read_h5ad(data / rel)
        for vocab in ("cellfm-27k", "cellfm-24k"):
            m = map_genes(a.var_names, load_vocabulary(vocab))
            cols = np.asarray(m.token_ids) > 0
            n = np.diff(sp.csr_matrix(sp.csr_matrix(a.X)[:, cols] > 0).indptr)
            print(f"{rel:52s} {vocab:10s} {len(n):6d} {np.percentile(n, 10):5.0f} {np.median(n):6.0f} "
                  f"{n.mean():6.0f} {np.percentile(n, 90):5.0f} {n.max():5d} {(n > 2048).mean() * 100:5.1f}% "
                  f"{np.minimum(n, 2048).mean():11.0f}")
            if vocab == "cellfm-27k":
                tokens.append(np.minimum(n, 2048))
    return np.concatenate(tokens)


def counted(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def check(preset: str, cells: list, device: str) -> list[tuple]:
    """Formula vs FlopCounterMode for the pretraining forward, the training step and the packed
    embedding of real cells, one cell per forward pass (no padding)."""
    from cellfm.batch import CellBatch
    from cellfm.config import get_preset
    from cellfm.model import CellFMModule
    from cellfm.model.loss import pretraining_loss
    from cellfm.tokenizer import mask_values
    from cellfm.tokenizer.packing import pack_cells

    cfg = get_preset(preset).replace(dropout=0.0)
    torch.manual_seed(0)
    module = CellFMModule(cfg).to(device)  # meta: shapes only, the counter needs no numbers
    rng = np.random.default_rng(0)
    lens = [len(c[1]) for c in cells]
    rows = []
    fwd = train = 0.0
    for _, ids, vals, _ in cells:
        hidden, loss = mask_values(len(ids), rng)
        t = {"device": device}
        batch = CellBatch(torch.as_tensor(ids, dtype=torch.long, **t)[None], torch.as_tensor(vals, **t)[None],
                          torch.ones(1, len(ids), dtype=torch.bool, **t), torch.as_tensor(hidden, **t)[None],
                          torch.as_tensor(loss, **t)[None])
        fwd += counted(lambda b=batch: module(b.gene_ids, b.values, b.token_mask, b.hidden_mask))

        def step(b=batch):
            out = module(b.gene_ids, b.values, b.token_mask, b.hidden_mask)
            pretraining_loss(out, b)["loss"].backward()

        train += counted(step)
    rows.append((preset, "forward (pretraining)", sum(forward_flops(cfg, n) for n in lens), fwd))
    rows.append((preset, "training step (fwd+bwd)", sum(train_flops(cfg, n) for n in lens), train))
    if device != "meta":  # the packed path reads its segment lengths, so it needs real tensors
        module.eval()
        packed = pack_cells([torch.as_tensor(c[1]) for c in cells], [torch.as_tensor(c[2]) for c in cells])
        emb = counted(lambda: module.cell_embedding_packed(packed))
        rows.append((preset, "embedding (packed)", sum(embed_flops(cfg, n) for n in lens), emb))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="the shared data folder (default: $CELLFM_DATA_DIR)")
    p.add_argument("--cells", type=int, default=4, help="real cells in the FLOP-counter check")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = data_dir(args.data_dir)
    tokens = gene_stats(data)
    cells = real_cells(data / FULL_TRANSCRIPTOME[0], "cellfm-27k", args.cells)
    print(f"\nformula vs torch.utils.flop_counter on {len(cells)} real PBMCs "
          f"({', '.join(str(len(c[1])) for c in cells)} genes), one cell a forward pass")
    print(f"{'preset':6s} {'what':26s} {'formula GFLOP':>14s} {'counted GFLOP':>14s} "
          f"{'counted/formula':>15s}")
    rows = check("80m", cells, "cpu") + check("800m", cells, "meta")
    for preset, what, f, c in rows:
        print(f"{preset:6s} {what:26s} {f / 1e9:14.2f} {c / 1e9:14.2f} {c / f:15.4f}")

    plan(tokens)


def plan(tokens: np.ndarray, cells: float = 100e6, epochs: int = 2, mfu: float = 0.4, gpus: int = 8) -> None:
    """Per-token and per-cell FLOPs, the cells/s an H100 sustains at `mfu`, and GPU-hours."""
    from cellfm.config import get_preset

    med, mean = float(np.median(tokens)), float(tokens.mean())
    print(f"\nplan: cells with min(genes, 2048) tokens, median {med:.0f}, mean {mean:.0f} (cost is linear in "
          f"tokens: GPU-hours use the mean); H100 bf16 dense {H100_BF16_DENSE / 1e12:.0f} TFLOP/s at "
          f"{mfu:.0%} MFU; {cells / 1e6:.0f}M cells x {epochs} epochs; loader rate for {gpus} GPUs")
    print(f"{'preset':6s} {'what':10s} {'MFLOP/token':>11s} {'GFLOP/cell med':>14s} {'GFLOP/cell mean':>15s} "
          f"{'cells/s/GPU':>11s} {'GPU-hours':>10s} {f'{gpus}-GPU cells/s':>14s}")
    for name in ("80m", "800m"):
        cfg = get_preset(name)
        for what, fn in (("train", train_flops), ("embed", embed_flops)):
            per_cell = fn(cfg, mean)
            rate = mfu * H100_BF16_DENSE / per_cell
            hours = cells * (epochs if what == "train" else 1) / rate / 3600
            print(f"{name:6s} {what:10s} {per_cell / mean / 1e6:11.1f} {fn(cfg, med) / 1e9:14.1f} "
                  f"{per_cell / 1e9:15.1f} {rate:11.0f} {hours:10.0f} {gpus * rate:14.0f}")
    print("(embed: one pass over the cells, packed; GPU-hours of embedding are for 1 pass, not 2 epochs)")


if __name__ == "__main__":
    main()

"""Embedding speed: cells/s, peak memory and achieved GFLOP/s of the encoder on real cells.

Measures, on this machine:
  1. the fp32 matmul peak (best of several large square `torch.mm`), the yardstick for GFLOP/s;
  2. per preset (`small`, `80m`; random weights: the weights do not change the speed): cells/s of
     the whole module and GFLOP/s of the encoder on real PBMC cells (pbmc4k_soupx, at most
     `max_genes` expressed genes per cell, batches grouped by length), peak RSS in a fresh process;
  3. the same cells through the same layers with softmax attention (scaled_dot_product_attention)
     in place of retention;
  4. a sweep of genes per cell (synthetic, one cell per batch) for retention vs softmax: time per
     token stays flat for retention (linear in L) and grows with L for softmax (quadratic);
  5. optionally (--cellfm-torch PATH) the authors' PyTorch port on the same cells and weights;
  6. `cellfm.embed` end to end (gene mapping, tokenization, model) when it is importable.

`--vs-port PATH` instead times only the authors' port against ours, interleaved (A B A B ...):
the same real cells, the same random weights of the `--vs-preset` shape (80m), fp32, >= 3 rounds,
min and median seconds, cells/s, the ratio and each side's peak extra RSS. Ours is
`CellFMModule.cell_embedding` (what `cellfm.embed` runs) and the full encoder; the port is its
`embedding_infer` on our length-grouped batches and, as its own data path does, padded to 2048.

FLOPs are counted analytically from the shapes (per token per layer: 8 d x d projections and the
retention's K^T V and Q (K^T V), 2 FLOPs per multiply-add; see `approx_flops_per_token`), over
real tokens only (padding is not counted as useful work).

    python benchmarks/embed.py                       # small + 80m, 256 cells, sweep on small
    python benchmarks/embed.py --cellfm-torch /tmp/official/CellFM-torch
    python benchmarks/embed.py --vs-port /tmp/cellfm-torch --threads 1 --cells 16 --rounds 3
    python benchmarks/embed.py --many-cells 100000 --threads 1   # flat memory (embed_many_cells.py)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/pbmc4k_soupx/pbmc4k_soupx_half.h5ad"


# ---- measurement helpers ---------------------------------------------------------------------
def best_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak_gflops(sizes=(2048, 3072, 4096), repeats: int = 5) -> tuple[float, int]:
    """Best fp32 GFLOP/s of a square torch.mm over a few sizes: the machine's practical peak."""
    best, best_n = 0.0, 0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        t = best_time(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), repeats=repeats)
        g = 2 * n**3 / t / 1e9
        if g > best:
            best, best_n = g, n
    return best, best_n


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakExtraRSS:
    """Largest RSS above the starting one while the block runs (sampled every 2 ms), so that two
    methods timed in one process each get their own peak."""

    def __enter__(self):
        self.base = self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())
        self.extra = self.peak - self.base


# ---- cells ----------------------------------------------------------------------------------
def load_cells(path: Path, n_cells: int, max_genes: int, n_vocab: int, seed: int = 0):
    """Real cells as (gene ids, log-normalised values) arrays per cell, sampled to max_genes.

    Gene ids are a fixed random map of the file's genes into the vocabulary: speed depends on
    the number of expressed genes per cell, not on which genes they are.
    """
    import anndata as ad

    adata = ad.read_h5ad(path)
    X = adata.X[:n_cells].tocsr()
    rng = np.random.default_rng(seed)
    gene_map = rng.integers(1, n_vocab + 1, X.shape[1])
    cells = []
    for i in range(X.shape[0]):
        a, b = X.indptr[i], X.indptr[i + 1]
        idx, cnt = X.indices[a:b], X.data[a:b].astype(np.float32)
        vals = np.log1p(cnt / cnt.sum() * 1e4)
        if len(idx) > max_genes:
            keep = rng.choice(len(idx), max_genes, replace=False)
            idx, vals = idx[keep], vals[keep]
        cells.append((gene_map[idx], vals))
    return cells


def make_batches(cells, batch_size: int):
    """Sort by length, pad right: (gene_ids, values, token_mask) per batch."""
    order = np.argsort([len(c[0]) for c in cells], kind="stable")
    batches = []
    for s in range(0, len(order), batch_size):
        group = [cells[i] for i in order[s : s + batch_size]]
        L = max(len(g[0]) for g in group)
        ids = torch.zeros(len(group), L, dtype=torch.long)
        vals = torch.zeros(len(group), L)
        mask = torch.zeros(len(group), L, dtype=torch.bool)
        for b, (gi, gv) in enumerate(group):
            ids[b, : len(gi)] = torch.from_numpy(gi)
            vals[b, : len(gv)] = torch.from_numpy(gv)
            mask[b, : len(gi)] = True
        batches.append((ids, vals, mask))
    return batches


# ---- softmax variant of the same layer --------------------------------------------------------
def softmax_layer_forward(layer, x, key_mask):
    """RetentionLayer's computation with O = softmax(Q K^T / sqrt(hd)) V in place of retention."""
    a = layer.attn
    B, T, D = x.shape
    h, hd = a.n_heads, a.head_dim
    q = a.q_proj(x).view(B, T, h, hd).transpose(1, 2)
    k = a.k_proj(x).view(B, T, h, hd).transpose(1, 2)
    v = a.v_proj(x).view(B, T, h, hd).transpose(1, 2)
    mask = None if key_mask is None else key_mask.bool().view(B, 1, 1, T)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, T, hd)
    u = F.silu(a.u_proj(x)).view(B, T, h, hd).transpose(1, 2)
    o = a.o_proj((o * u).transpose(1, 2).reshape(B, T, D))
    x = layer.post_norm1(x * layer.alpha + o)
    return layer.post_norm2(x * layer.alpha + layer.ffn(x))


def encode_softmax(module, ids, vals, mask):
    B = ids.shape[0]
    x = module.gene_emb[ids] + module.value_enc(vals)
    x = torch.cat([module.cls_token.expand(B, 1, -1), x], dim=1)
    keep = torch.cat([mask.new_ones(B, 1), mask], dim=1)
    x = x * keep.unsqueeze(-1)
    key_mask = None if bool(keep.all()) else keep
    for layer in module.encoder:
        x = softmax_layer_forward(layer, x, key_mask)
    return x


# ---- one preset on real cells (runs in a fresh process for a clean peak RSS) -----------------
def run_preset(preset: str, data: str, n_cells: int, batch_size: int, threads: int,
               official: str | None, softmax: bool, repeats: int) -> dict:
    torch.set_num_threads(threads)
    from cellfm.config import get_preset
    from cellfm.model import CellFMModule
    from cellfm.model.module import approx_flops_per_token

    cfg = get_preset(preset)
    torch.manual_seed(0)
    module = CellFMModule(cfg).eval()
    cells = load_cells(Path(data), n_cells, cfg.max_genes, cfg.n_genes)
    batches = make_batches(cells, batch_size)
    real_tokens = sum(len(c[0]) + 1 for c in cells)  # + CLS
    padded_tokens = sum(b[0].numel() + b[0].shape[0] for b in batches)
    d, hd = cfg.d_model, cfg.head_dim
    enc_flops = real_tokens * cfg.n_layers * (2 * 8 * d * d + 2 * 2 * d * hd)
    rss0 = peak_rss_mib()

    def forward_all():
        with torch.inference_mode():
            for ids, vals, mask in batches:
                module(ids, vals, mask)

    def encode_all():
        with torch.inference_mode():
            for ids, vals, mask in batches:
                module.encode(ids, vals, mask)

    t_full = best_time(forward_all, repeats=repeats)
    t_enc = best_time(encode_all, repeats=repeats)
    res = {
        "preset": preset, "d": d, "layers": cfg.n_layers, "cells": len(cells),
        "mean_genes": real_tokens / len(cells) - 1, "padding": padded_tokens / real_tokens - 1,
        "cells_s": len(cells) / t_full, "enc_gflops": enc_flops / t_enc / 1e9,
        "full_gflops": real_tokens * approx_flops_per_token(cfg) / t_full / 1e9,
        "rss_model": rss0, "rss_peak": peak_rss_mib(), "enc_cells_s": len(cells) / t_enc,
    }
    if softmax:
        def softmax_all():
            with torch.inference_mode():
                for ids, vals, mask in batches:
                    encode_softmax(module, ids, vals, mask)

        res["softmax_enc_cells_s"] = len(cells) / best_time(softmax_all, repeats=repeats)
    if official:
        res.update(run_official(official, module, cfg, batches, len(cells), repeats))
    return res


# ---- the authors' PyTorch port ----------------------------------------------------------------
def port_with_our_weights(path: str, module, cfg):
    """CellFM-torch's FinetuneModel (imported from the checkout at PATH) holding our weights."""
    sys.path.insert(0, path)
    from layers.torch_finetune import FinetuneModel  # the authors' code, read from PATH

    class Cfg:  # the fields FinetuneModel reads
        enc_dims, enc_nlayers, enc_num_heads = cfg.d_model, cfg.n_layers, cfg.n_heads
        enc_dropout, dropout, lora, recompute = 0.0, 0.0, 0, False
        add_zero, pad_zero, ecs, ecs_threshold = False, True, False, 0.8

    theirs = FinetuneModel(cfg.n_genes, Cfg()).eval()
    renamed = {}
    for k, v in module.state_dict().items():
        if k.startswith("value_enc.") and k != "value_enc.mask_emb":
            k = "value_enc.value_enc." + k.removeprefix("value_enc.")
        renamed[k] = v
    their_state = theirs.state_dict()
    loaded = {k: v for k, v in renamed.items() if k in their_state and their_state[k].shape == v.shape}
    theirs.load_state_dict(loaded, strict=False)
    needed = [k for k in their_state if k.startswith(("encoder.", "value_enc.", "gene_emb", "cls_token"))]
    missing = [k for k in needed if k not in loaded]
    if missing:
        raise RuntimeError(f"could not map our weights onto CellFM-torch: {missing[:5]}")
    return theirs


def run_vs_port(path: str, preset: str, data: str, n_cells: int, batch_size: int, threads: int,
                rounds: int, padded: bool) -> dict:
    """Ours and the port interleaved, round by round, on the same batches and weights."""
    torch.set_num_threads(threads)
    from cellfm.config import get_preset
    from cellfm.model import CellFMModule

    cfg = get_preset(preset)
    torch.manual_seed(0)
    module = CellFMModule(cfg).eval()
    theirs = port_with_our_weights(path, module, cfg)
    cells = load_cells(Path(data), n_cells, cfg.max_genes, cfg.n_genes)
    batches = make_batches(cells, batch_size)
    full = [(F.pad(i, (0, cfg.max_genes - i.shape[1])), F.pad(v, (0, cfg.max_genes - v.shape[1])),
             F.pad(m, (0, cfg.max_genes - m.shape[1]))) for i, v, m in batches]
    methods = {
        "ours: cell_embedding": lambda: [module.cell_embedding(i, v, m) for i, v, m in batches],
        "ours: full encoder": lambda: [module.encode(i, v, m)[0][:, 0] for i, v, m in batches],
        "port: embedding_infer": lambda: [theirs.embedding_infer(v, i, None, m.float())[0][:, 0]
                                          for i, v, m in batches],
    }
    if padded:
        methods["port: padded to 2048"] = lambda: [theirs.embedding_infer(v, i, None, m.float())[0][:, 0]
                                                   for i, v, m in full]
    times = {name: [] for name in methods}
    peaks = dict.fromkeys(methods, 0.0)
    with torch.inference_mode():
        outs = {name: torch.cat(fn()) for name, fn in methods.items()}  # warm-up and outputs
        for _ in range(rounds):
            for name, fn in methods.items():  # A B A B ...
                with PeakExtraRSS() as mem:
                    t = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)
                peaks[name] = max(peaks[name], mem.extra)
    ref = outs["ours: full encoder"]
    return {
        "cells": len(cells), "mean_genes": sum(len(c[0]) for c in cells) / len(cells),
        "rows": [{"name": n, "min": min(t), "median": statistics.median(t), "peak": peaks[n],
                  "max_diff": (outs[n] - ref).abs().max().item(),
                  "min_cos": F.cosine_similarity(outs[n], ref, dim=-1).min().item()}
                 for n, t in times.items()],
    }


def run_official(path: str, module, cfg, batches, n_cells: int, repeats: int) -> dict:
    """Time CellFM-torch's FinetuneModel.embedding_infer on the same batches and weights."""
    if cfg.value_bins != 256:
        return {"official_note": f"needs value_bins=256 (preset has {cfg.value_bins})"}
    theirs = port_with_our_weights(path, module, cfg)

    def official_all():
        with torch.inference_mode():
            for ids, vals, mask in batches:
                theirs.embedding_infer(vals, ids, None, mask.float())

    t = best_time(official_all, repeats=repeats)
    # the port's own data path (`Prepare.pad_zero`, `SCrna`) pads every cell to nonz_len = 2048
    full = [(F.pad(i, (0, cfg.max_genes - i.shape[1])), F.pad(v, (0, cfg.max_genes - v.shape[1])),
             F.pad(m, (0, cfg.max_genes - m.shape[1]))) for i, v, m in batches]

    def official_padded():
        with torch.inference_mode():
            for ids, vals, mask in full:
                theirs.embedding_infer(vals, ids, None, mask.float())

    t_padded = best_time(official_padded, repeats=repeats)
    ids, vals, mask = batches[len(batches) // 2]
    with torch.inference_mode():
        a = module.encode(ids, vals, mask)[0][:, 0]
        b = theirs.embedding_infer(vals, ids, None, mask.float())[0][:, 0]
    cos = F.cosine_similarity(a, b, dim=-1).min().item()
    return {"official_cells_s": n_cells / t, "official_padded_cells_s": n_cells / t_padded,
            "official_min_cos": cos}


# ---- genes-per-cell sweep -----------------------------------------------------------------------
def run_sweep(preset: str, lengths: list[int], threads: int, softmax_max: int, repeats: int) -> list[dict]:
    torch.set_num_threads(threads)
    from cellfm.config import get_preset
    from cellfm.model import CellFMModule

    cfg = get_preset(preset).replace(max_genes=max(lengths))
    torch.manual_seed(0)
    module = CellFMModule(cfg).eval()
    rows = []
    for L in lengths:
        ids = torch.randint(1, cfg.n_genes + 1, (1, L))
        vals = torch.rand(1, L) * 3
        mask = torch.ones(1, L, dtype=torch.bool)
        with torch.inference_mode():
            t_ret = best_time(lambda ids=ids, vals=vals, mask=mask: module.encode(ids, vals, mask),
                              repeats=repeats)
            t_sm = float("nan")
            if L <= softmax_max:
                def softmax_run(ids=ids, vals=vals, mask=mask):
                    return encode_softmax(module, ids, vals, mask)

                t_sm = best_time(softmax_run, repeats=repeats)
        rows.append({"L": L, "ret_ms": t_ret * 1e3, "ret_us_tok": t_ret / L * 1e6,
                     "sm_ms": t_sm * 1e3, "sm_us_tok": t_sm / L * 1e6})
    return rows


def in_fresh_process(fn, *args):
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# ---- end to end ---------------------------------------------------------------------------------
def run_embed(data: str, n_cells: int, batch_size: int, threads: int) -> dict | None:
    torch.set_num_threads(threads)
    try:
        import anndata as ad

        import cellfm
        from cellfm.embedding import embed
    except ImportError as err:
        return {"error": str(err)}
    adata = ad.read_h5ad(data)[:n_cells].copy()
    torch.manual_seed(0)
    try:
        model = cellfm.CellFM.from_preset("small")
    except ImportError as err:  # the vocabulary package is missing
        return {"error": str(err)}
    t = time.perf_counter()
    embed(adata, model, batch_size=batch_size, device="cpu", progress=False, empty="zero")
    return {"cells_s": n_cells / (time.perf_counter() - t), "rss_peak": peak_rss_mib()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--cells", type=int, default=None, help="default 256 (16 with --vs-port)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--presets", nargs="+", default=["small", "80m"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--sweep-preset", default="small")
    p.add_argument("--sweep", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--softmax-max", type=int, default=16384, help="longest cell for softmax in the sweep")
    p.add_argument("--no-softmax", action="store_true")
    p.add_argument("--repeats", type=int, default=2, help="timed runs after a warm-up (best kept)")
    p.add_argument("--cellfm-torch", default=None, help="path of a local CellFM-torch checkout")
    p.add_argument("--vs-port", default=None, metavar="PATH",
                   help="only: the port at PATH vs ours, interleaved (see above)")
    p.add_argument("--vs-preset", default="80m")
    p.add_argument("--rounds", type=int, default=3, help="--vs-port rounds (>= 3)")
    p.add_argument("--no-padded", action="store_true", help="--vs-port: skip the port padded to 2048")
    p.add_argument("--many-cells", type=int, default=None, metavar="N",
                   help="only: peak RSS of streaming embed_file for 1,000 vs N synthetic cells (tiny model)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    if args.many_cells:
        from embed_many_cells import run as many_cells

        many_cells(args.many_cells, args.threads, in_fresh_process)
        return
    if args.vs_port:
        vs_port(args)
        return
    args.cells = args.cells or 256
    peak, n = matmul_peak_gflops()
    print(f"torch {torch.__version__}, {args.threads} threads; fp32 matmul peak {peak:.1f} GFLOP/s "
          f"(torch.mm {n}x{n}, best of 5)\n")

    print(f"real cells: {args.data} (first {args.cells}), batch size {args.batch_size}")
    hdr = (f"{'preset':7s} {'d':>5s} {'lay':>3s} {'genes/cell':>10s} {'pad':>5s} {'cells/s':>8s} "
           f"{'enc GFLOP/s':>11s} {'% peak':>6s} {'RSS MiB':>8s}")
    extra = "" if args.no_softmax else f" {'ret enc c/s':>11s} {'softmax c/s':>11s}"
    if args.cellfm_torch:
        extra += (f" {'official c/s':>12s} {'speed-up':>8s} {'official@2048 c/s':>17s} {'speed-up':>8s}"
                  f" {'min cos':>7s}")
    print(hdr + extra)
    for preset in args.presets:
        r = in_fresh_process(run_preset, preset, args.data, args.cells, args.batch_size, args.threads,
                             args.cellfm_torch, not args.no_softmax, args.repeats)
        line = (f"{r['preset']:7s} {r['d']:5d} {r['layers']:3d} {r['mean_genes']:10.0f} "
                f"{r['padding'] * 100:4.1f}% {r['cells_s']:8.1f} {r['enc_gflops']:11.1f} "
                f"{r['enc_gflops'] / peak * 100:5.0f}% {r['rss_peak']:8.0f}")
        if not args.no_softmax:
            line += f" {r['enc_cells_s']:11.1f} {r['softmax_enc_cells_s']:11.1f}"
        if "official_cells_s" in r:
            ours = r["enc_cells_s"]  # embedding = encoder only, as embedding_infer
            line += (f" {r['official_cells_s']:12.1f} {ours / r['official_cells_s']:7.2f}x"
                     f" {r['official_padded_cells_s']:17.1f} {ours / r['official_padded_cells_s']:7.2f}x"
                     f" {r['official_min_cos']:7.4f}")
        elif "official_note" in r:
            line += f"  official: {r['official_note']}"
        print(line, flush=True)

    if args.sweep:
        print(f"\ngenes-per-cell sweep ({args.sweep_preset}, one synthetic cell, encoder only)")
        print(f"{'genes':>6s} {'retention ms':>12s} {'us/token':>9s} {'softmax ms':>11s} {'us/token':>9s} "
              f"{'softmax/ret':>11s}")
        rows = in_fresh_process(run_sweep, args.sweep_preset, args.sweep, args.threads,
                                0 if args.no_softmax else args.softmax_max, args.repeats)
        for r in rows:
            print(f"{r['L']:6d} {r['ret_ms']:12.2f} {r['ret_us_tok']:9.3f} {r['sm_ms']:11.2f} "
                  f"{r['sm_us_tok']:9.3f} {r['sm_ms'] / r['ret_ms']:10.1f}x")

    r = in_fresh_process(run_embed, args.data, args.cells, args.batch_size, args.threads)
    if "error" in r:
        print(f"\ncellfm.embed end to end: skipped ({r['error']})")
    else:
        print(f"\ncellfm.embed end to end (small, {args.cells} cells, from AnnData): "
              f"{r['cells_s']:.1f} cells/s, peak RSS {r['rss_peak']:.0f} MiB")


def vs_port(args) -> None:
    if args.rounds < 3:
        raise SystemExit("--rounds must be at least 3")
    n_cells = args.cells or 16
    r = in_fresh_process(run_vs_port, args.vs_port, args.vs_preset, args.data, n_cells,
                         min(args.batch_size, n_cells), args.threads, args.rounds, not args.no_padded)
    print(f"torch {torch.__version__}, {args.threads} thread(s), preset {args.vs_preset}, fp32, random "
          f"weights shared by both; {r['cells']} real cells of {args.data} ({r['mean_genes']:.0f} genes "
          f"a cell on average), batch size {min(args.batch_size, n_cells)}; {args.rounds} interleaved rounds")
    port = next(x for x in r["rows"] if x["name"] == "port: embedding_infer")
    print(f"{'method':24s} {'min s':>8s} {'median s':>9s} {'cells/s':>8s} {'vs port':>8s} "
          f"{'peak +RSS MiB':>13s} {'max |diff|':>10s} {'min cos':>8s}")
    for x in r["rows"]:
        print(f"{x['name']:24s} {x['min']:8.2f} {x['median']:9.2f} {r['cells'] / x['median']:8.2f} "
              f"{port['median'] / x['median']:7.2f}x {x['peak']:13.0f} {x['max_diff']:10.2e} "
              f"{x['min_cos']:8.5f}")
    print("(vs port: median time of the port's embedding_infer on the same batches / this method's; "
          "diff and cos against our full encoder's CLS output)")


if __name__ == "__main__":
    main()

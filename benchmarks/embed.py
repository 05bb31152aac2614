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

`--compare` instead times, interleaved (A B C A B C ...) on the same real cells (default 32) and
random weights of the `--vs-preset` shape (80m), fp32, >= 3 rounds: `CellFMModule.cell_embedding`
on length-sorted padded batches of the size `cellfm.embed` uses (`default_batch_size`) and of one
cell, `cell_embedding_packed` on one pack and on packs of a token budget (`--budgets`), and with
`--vs-port PATH` the authors' port (`embedding_infer` on the same padded batches; with
`--port-padded` also padded to 2048 as its own data path does). It prints min and median
seconds, cells/s, both ratios (vs the embed default, vs the port) and each method's peak extra RSS.

The data: `--data FILE`, or `--data-dir DIR` / $CELLFM_DATA_DIR holding pbmc4k_soupx (no path is
guessed from the source tree). The padded batch size defaults to what `cellfm.embed` uses on CPU.

FLOPs are counted analytically from the shapes (per token per layer: 8 d x d projections and the
retention's K^T V and Q (K^T V), 2 FLOPs per multiply-add; see `approx_flops_per_token`), over
real tokens only (padding is not counted as useful work).

    export CELLFM_DATA_DIR=../shared/data
    python benchmarks/embed.py                       # small + 80m, 256 cells, sweep on small
    python benchmarks/embed.py --cellfm-torch /tmp/official/CellFM-torch
    python benchmarks/embed.py --compare --vs-port /tmp/cellfm-torch --threads 1 --cells 32 --rounds 3
    python benchmarks/embed.py --many-cells 100000 --threads 1   # flat memory (embed_many_cells.py)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from measure import PeakExtraRSS, best_time, in_fresh_process, matmul_peak_gflops, peak_rss_mib
from port import port_with_our_weights, run_official
from real_cells import PBMC, embed_batch_size, load_cells, make_batches, make_packs, pbmc_file


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


# ---- padded vs packed vs the authors' port -----------------------------------------------------
def run_compare(port: str | None, preset: str, data: str, n_cells: int, batch_size: int, threads: int,
                rounds: int, port_padded: bool, budgets: list[int], extra: bool = True) -> dict:
    """Padded batches, packed streams and (with `port`) the authors' port, interleaved round by
    round (A B C A B C ...) on the same real cells and random weights."""
    torch.set_num_threads(threads)
    from cellfm.config import get_preset
    from cellfm.model import CellFMModule

    cfg = get_preset(preset)
    torch.manual_seed(0)
    module = CellFMModule(cfg).eval()
    cells = load_cells(Path(data), n_cells, cfg.max_genes, cfg.n_genes)
    batches = make_batches(cells, batch_size)  # sorted by length, as cellfm.embed batches a chunk
    singles = make_batches(cells, 1)

    def packed(packs):
        return lambda: [module.cell_embedding_packed(pk) for pk in packs]

    methods = {f"padded, batch {batch_size} (embed)": lambda: [module.cell_embedding(*b) for b in batches]}
    if extra:
        methods["padded, 1 cell a pass"] = lambda: [module.cell_embedding(*b) for b in singles]
        methods[f"packed, {len(cells)} cells in 1 pack"] = packed(make_packs(cells, None))
    for t in budgets:
        methods[f"packed, <= {t} tokens a pack"] = packed(make_packs(cells, t))
    if port:
        theirs = port_with_our_weights(port, module, cfg)
        methods[f"port, batch {batch_size}"] = lambda: [
            theirs.embedding_infer(v, i, None, m.float())[0][:, 0] for i, v, m in batches]
        if port_padded:
            full = [(F.pad(i, (0, cfg.max_genes - i.shape[1])), F.pad(v, (0, cfg.max_genes - v.shape[1])),
                     F.pad(m, (0, cfg.max_genes - m.shape[1]))) for i, v, m in batches]
            methods["port, padded to 2048"] = lambda: [
                theirs.embedding_infer(v, i, None, m.float())[0][:, 0] for i, v, m in full]
    times = {name: [] for name in methods}
    cpu = {name: [] for name in methods}
    peaks = dict.fromkeys(methods, 0.0)
    with torch.inference_mode():
        ref = torch.cat([module.encode(*b)[0][:, 0] for b in batches])  # the full forward's CLS
        outs = {name: torch.cat(fn()) for name, fn in methods.items()}  # warm-up and outputs
        for _ in range(rounds):
            for name, fn in methods.items():
                with PeakExtraRSS() as mem:
                    t, c = time.perf_counter(), time.thread_time()
                    fn()
                    times[name].append(time.perf_counter() - t)
                    cpu[name].append(time.thread_time() - c)
                peaks[name] = max(peaks[name], mem.extra)
    padded_tokens = sum(b[0].numel() for b in batches)
    real_tokens = sum(len(c[0]) for c in cells)
    return {
        "cells": len(cells), "mean_genes": real_tokens / len(cells),
        "padding": padded_tokens / real_tokens - 1,
        "rows": [{"name": n, "min": min(t), "median": statistics.median(t), "peak": peaks[n],
                  "cpu_min": min(cpu[n]), "cpu_median": statistics.median(cpu[n]),
                  "max_diff": (outs[n] - ref).abs().max().item(),
                  "min_cos": F.cosine_similarity(outs[n], ref, dim=-1).min().item()}
                 for n, t in times.items()],
    }


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
    p.add_argument("--data", default=None, help=f"an .h5ad of raw counts (default: DATA_DIR/{PBMC})")
    p.add_argument("--data-dir", default=None, help="the shared data folder (default: $CELLFM_DATA_DIR)")
    p.add_argument("--cells", type=int, default=None, help="default 256 (32 with --compare / --vs-port)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="cells per padded batch (default: what cellfm.embed uses on CPU)")
    p.add_argument("--presets", nargs="+", default=["small", "80m"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--sweep-preset", default="small")
    p.add_argument("--sweep", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--softmax-max", type=int, default=16384, help="longest cell for softmax in the sweep")
    p.add_argument("--no-softmax", action="store_true")
    p.add_argument("--repeats", type=int, default=2, help="timed runs after a warm-up (best kept)")
    p.add_argument("--cellfm-torch", default=None, help="path of a local CellFM-torch checkout")
    p.add_argument("--compare", action="store_true",
                   help="only: padded vs packed (vs the port with --vs-port), interleaved (see above)")
    p.add_argument("--vs-port", default=None, metavar="PATH",
                   help="a CellFM-torch checkout to add to --compare (implies --compare)")
    p.add_argument("--budgets", type=int, nargs="*", default=[2048, 4096, 8192],
                   help="--compare: token budgets of packs to time")
    p.add_argument("--vs-preset", default="80m")
    p.add_argument("--rounds", type=int, default=3, help="--vs-port rounds (>= 3)")
    p.add_argument("--skip-extra", action="store_true",
                   help="--compare: leave out the 1-cell padded and the all-cells-in-1-pack rows")
    p.add_argument("--port-padded", action="store_true", help="--vs-port: also the port padded to 2048")
    p.add_argument("--many-cells", type=int, default=None, metavar="N",
                   help="only: peak RSS of streaming embed_file for 1,000 vs N synthetic cells (tiny model)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    batch_size, source = (args.batch_size, "--batch-size") if args.batch_size else embed_batch_size("cpu")
    if args.many_cells:
        from embed_many_cells import run as many_cells

        many_cells(args.many_cells, args.threads, in_fresh_process)
        return
    data = pbmc_file(args.data, args.data_dir)
    if args.compare or args.vs_port:
        compare(args, data, batch_size, source)
        return
    args.cells = args.cells or 256
    peak, n = matmul_peak_gflops()
    print(f"torch {torch.__version__}, {args.threads} threads; fp32 matmul peak {peak:.1f} GFLOP/s "
          f"(torch.mm {n}x{n}, best of 5)\n")

    print(f"real cells: {data} (first {args.cells}), batch size {batch_size} ({source})")
    hdr = (f"{'preset':7s} {'d':>5s} {'lay':>3s} {'genes/cell':>10s} {'pad':>5s} {'cells/s':>8s} "
           f"{'enc GFLOP/s':>11s} {'% peak':>6s} {'RSS MiB':>8s}")
    extra = "" if args.no_softmax else f" {'ret enc c/s':>11s} {'softmax c/s':>11s}"
    if args.cellfm_torch:
        extra += (f" {'official c/s':>12s} {'speed-up':>8s} {'official@2048 c/s':>17s} {'speed-up':>8s}"
                  f" {'min cos':>7s}")
    print(hdr + extra)
    for preset in args.presets:
        r = in_fresh_process(run_preset, preset, str(data), args.cells, batch_size, args.threads,
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

    r = in_fresh_process(run_embed, str(data), args.cells, batch_size, args.threads)
    if "error" in r:
        print(f"\ncellfm.embed end to end: skipped ({r['error']})")
    else:
        print(f"\ncellfm.embed end to end (small, {args.cells} cells, from AnnData): "
              f"{r['cells_s']:.1f} cells/s, peak RSS {r['rss_peak']:.0f} MiB")


def compare(args, data: Path, batch_size: int, source: str) -> None:
    if args.rounds < 3:
        raise SystemExit("--rounds must be at least 3")
    n_cells = args.cells or 32
    r = in_fresh_process(run_compare, args.vs_port, args.vs_preset, str(data), n_cells, batch_size,
                         args.threads, args.rounds, args.port_padded, args.budgets, not args.skip_extra)
    print(f"torch {torch.__version__}, {args.threads} thread(s), preset {args.vs_preset}, fp32, random "
          f"weights; {r['cells']} real cells of {data} ({r['mean_genes']:.0f} genes a cell on average); "
          f"padded batch size {batch_size} from {source} ({r['padding'] * 100:.0f}% padding tokens); "
          f"{args.rounds} interleaved rounds")
    rows = r["rows"]
    base = rows[0]
    port = next((x for x in rows if x["name"].startswith("port, batch")), None)
    clocks = (("wall-clock", "min", "median"), ("CPU time of the main thread", "cpu_min", "cpu_median"))
    for clock, lo, med in clocks:
        print(f"\n{clock}:")
        print(f"{'method':30s} {'min s':>7s} {'median s':>8s} {'cells/s min|med':>16s} "
              f"{'vs embed min|med':>17s} {'vs port min|med':>16s} {'peak +RSS MiB':>13s} "
              f"{'max |diff|':>10s} {'min cos':>8s}")
        for x in rows:
            def ratio(other, x=x, lo=lo, med=med):
                return "-" if other is None else f"{other[lo] / x[lo]:.2f}x|{other[med] / x[med]:.2f}x"

            print(f"{x['name']:30s} {x[lo]:7.2f} {x[med]:8.2f} "
                  f"{r['cells'] / x[lo]:7.2f}|{r['cells'] / x[med]:<7.2f} {ratio(base):>17s} "
                  f"{ratio(port):>16s} {x['peak']:13.0f} {x['max_diff']:10.2e} {x['min_cos']:8.5f}")
    print("(vs X: X's time / this method's time, from the min and from the median of the rounds; diff and "
          "cos against the full forward's CLS output; with 1 thread the CPU time leaves out the time the "
          "machine's other jobs held the core)")


if __name__ == "__main__":
    main()

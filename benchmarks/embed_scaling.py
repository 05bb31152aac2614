"""Process scaling of `cellfm embed`: 1 process x 1 thread vs P processes x 1 thread each
(`torchrun`, gloo) on the same input and machine. Target (issue 10): 2 processes >= 1.8x one.

Input: the real PBMCs of pbmc4k_soupx_half.h5ad (2,170 cells, raw counts) repeated to `--cells`
(synthetic replication: the same cells over again, unique names), written once as an .h5ad that
`cellfm embed` reads backed. Model: `--model` (default the built-in cellfm-mini). Output: a
.parquet (`--obsm-only`). The chunk grid (`--chunk-cells`, default: 8 chunks per process) is the
same for both runs, so the outputs must be equal; the table says how far apart they are.

Timed per run, `--rounds` times, the order alternating (1, P, P, 1, ...):
- end to end: wall time of the whole command (Python start, imports, checks, embedding, merge);
- embedding phase: the slowest rank's seconds reading, tokenizing, running the model and saving
  its chunks (each rank prints them), i.e. without start-up, checks and merge.
Each process has one thread (`--threads 1`, OMP_NUM_THREADS=1); it needs P free cores to mean
anything: run it when nothing else is running.

    python benchmarks/embed_scaling.py                            # 20,000 cells, 2 processes, 3 rounds
    python benchmarks/embed_scaling.py --cells 2000 --rounds 1    # does it work (seconds, not a measurement)
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/pbmc4k_soupx/pbmc4k_soupx_half.h5ad"


def write_replicated(source: Path, n_cells: int, path: Path) -> None:
    """The cells of `source` repeated until there are `n_cells`, names made unique ("-r<k>")."""
    import anndata as ad
    import scipy.sparse as sp

    cells = ad.read_h5ad(source)
    reps = -(-n_cells // cells.n_obs)
    X = sp.vstack([sp.csr_matrix(cells.X)] * reps, format="csr")[:n_cells]
    out = ad.AnnData(X=X, var=cells.var)
    out.obs_names = [f"{c}-r{k}" for k in range(reps) for c in cells.obs_names][:n_cells]
    out.write_h5ad(path)


def run_embed(processes: int, src: Path, out: Path, model: str, chunk_cells: int, batch_size: int) -> dict:
    """One `cellfm embed` run; (end-to-end seconds, slowest rank's embedding seconds)."""
    embed = ["-m", "cellfm.cli", "embed", str(src), "-o", str(out), "--obsm-only", "--overwrite",
             "--model", model, "--device", "cpu", "--threads", "1", "--chunk-cells", str(chunk_cells),
             "--batch-size", str(batch_size)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(processes), *embed]
    else:
        cmd = [sys.executable, *embed]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    ranks = [float(s) for s in re.findall(r"rank \d+: embedded \d+ chunks.* in ([\d.]+) s", text)]
    if len(ranks) != processes:
        raise RuntimeError(f"expected {processes} rank lines, found {len(ranks)}:\n{text[-3000:]}")
    return {"end_to_end": seconds, "embedding": max(ranks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="real cells to replicate (raw counts)")
    p.add_argument("--cells", type=int, default=20_000)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="cellfm-mini")
    p.add_argument("--chunk-cells", type=int, default=None, help="default: 8 chunks per process")
    p.add_argument("--batch-size", type=int, default=16, help="cellfm embed's CPU default")
    args = p.parse_args()
    if not args.data.exists():
        sys.exit(f"{args.data} not found: pass --data with an .h5ad of raw counts")
    chunk = args.chunk_cells or -(-args.cells // (8 * args.processes))
    n_chunks = -(-args.cells // chunk)
    runs: dict[int, list[dict]] = {1: [], args.processes: []}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "cells.h5ad"
        write_replicated(args.data, args.cells, src)
        outs = {k: Path(tmp) / f"emb_{k}.parquet" for k in runs}
        for r in range(args.rounds):
            order = [1, args.processes] if r % 2 == 0 else [args.processes, 1]
            for k in order:
                runs[k].append(run_embed(k, src, outs[k], args.model, chunk, args.batch_size))
                print(f"round {r + 1}, {k} process(es): {runs[k][-1]}", file=sys.stderr)
        import pandas as pd

        one, many = pd.read_parquet(outs[1]), pd.read_parquet(outs[args.processes])
        same_names = list(one.index) == list(many.index)
        diff = float(np.abs(one.to_numpy() - many.to_numpy()).max())
    report(args, chunk, n_chunks, runs, same_names, diff)


def report(args, chunk: int, n_chunks: int, runs: dict[int, list[dict]], same_names: bool,
           diff: float) -> None:
    P, n = args.processes, args.cells
    print(f"\ncellfm embed, {args.model}, {n:,} cells = real PBMCs of {args.data.name} replicated "
          f"(synthetic replication), .h5ad (backed) in, .parquet out, CPU fp32, 1 thread per process, "
          f"{n_chunks} chunks of {chunk:,} cells, batch {args.batch_size}, {args.rounds} rounds "
          "(min / median)")
    print(f"{'setup':<28s} {'end-to-end s':>16s} {'cells/s':>8s} {'embedding s':>16s} {'cells/s':>8s}")
    best = {}
    for k, label in ((1, "1 process x 1 thread"), (P, f"{P} processes x 1 thread (gloo)")):
        e2e = [x["end_to_end"] for x in runs[k]]
        emb = [x["embedding"] for x in runs[k]]
        best[k] = (min(e2e), min(emb))
        print(f"{label:<28s} {min(e2e):7.1f} / {statistics.median(e2e):6.1f} {n / min(e2e):8.0f} "
              f"{min(emb):7.1f} / {statistics.median(emb):6.1f} {n / min(emb):8.0f}")
    print(f"{'speed-up (min times)':<28s} {best[1][0] / best[P][0]:15.2f}x {'':>8s} "
          f"{best[1][1] / best[P][1]:15.2f}x   (target >= 1.8x for 2 processes)")
    print(f"outputs 1 vs {P} processes: same cell names {same_names}, max |difference| {diff:.2g}")


if __name__ == "__main__":
    main()

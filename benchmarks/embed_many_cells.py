"""Memory of streaming embedding vs the number of cells (`python benchmarks/embed.py --many-cells N`).

For 1,000 and N cells: writes a synthetic count file (backed .h5ad: real vocabulary genes,
~200 expressed genes a cell, integer counts), then in a fresh process runs `cellfm.embed_file`
into a full output .h5ad (the input copied + obsm) with the `tiny` model, and reports cells/s,
peak RSS of that process, and the peak minus the RSS right before `embed_file` (imports and the
model are the same for every N). Flat memory: the two peaks agree within a few per cent.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import numpy as np

N_GENES, GENES_PER_CELL = 2000, 200
WRITE_CHUNK = 5_000


def write_synthetic(path: Path, n_cells: int, seed: int = 0) -> None:
    """A backed-readable .h5ad written in row chunks (never the whole matrix in memory)."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import write_elem

    import cellfm

    genes = np.asarray(cellfm.CellFM.from_preset("tiny").vocab.genes[:N_GENES], dtype=str)
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(N_GENES, 0.3))  # a few highly expressed genes, many rare
    first = True
    with h5py.File(path, "w") as f:
        write_elem(f, "obs", pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]))
        write_elem(f, "var", pd.DataFrame(index=genes))
        for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, name, {})
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        for a in range(0, n_cells, WRITE_CHUNK):
            rows = min(WRITE_CHUNK, n_cells - a)
            order = np.argsort(rng.random((rows, N_GENES)) / weights, axis=1)  # weighted, no repeats
            cols = np.sort(order[:, :GENES_PER_CELL], axis=1)
            counts = rng.geometric(0.4, size=(rows, GENES_PER_CELL)).astype(np.float32)
            block = sp.csr_matrix((counts.ravel(), cols.ravel(), np.arange(rows + 1) * GENES_PER_CELL),
                                  shape=(rows, N_GENES))
            if first:
                write_elem(f, "X", block)
                first = False
            else:
                ad.io.sparse_dataset(f["X"]).append(block)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def embed_in_this_process(src: str, out: str, threads: int, chunk_cells: int) -> dict:
    import torch

    import cellfm

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = cellfm.CellFM.from_preset("tiny")
    before = rss_mib()
    t = time.perf_counter()
    result = cellfm.embed_file(src, model, out, device="cpu", progress=False, chunk_cells=chunk_cells)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"cells": result.n_cells, "chunks": result.n_chunks, "seconds": seconds, "peak": peak,
            "before": before}


def run(n_many: int, threads: int, in_fresh_process, chunk_cells: int = 1000) -> None:
    sizes = [1000, n_many] if n_many != 1000 else [1000]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            src, out = Path(tmp) / f"cells_{n}.h5ad", Path(tmp) / f"emb_{n}.h5ad"
            t = time.perf_counter()
            in_fresh_process(write_synthetic, src, n)
            written = time.perf_counter() - t
            r = in_fresh_process(embed_in_this_process, str(src), str(out), threads, chunk_cells)
            r.update(input_mib=src.stat().st_size / 2**20, output_mib=out.stat().st_size / 2**20,
                     write_s=written)
            rows.append(r)
    print(f"streaming embed_file, tiny model, {threads} thread(s), synthetic counts ({GENES_PER_CELL} of "
          f"{N_GENES} genes a cell), backed .h5ad in, full .h5ad out (input copied + obsm), "
          f"chunks of {chunk_cells:,} cells")
    print(f"{'cells':>8s} {'chunks':>6s} {'input MiB':>9s} {'output MiB':>10s} {'s':>7s} {'cells/s':>8s} "
          f"{'RSS before MiB':>14s} {'peak RSS MiB':>12s} {'peak - before':>13s}")
    for r in rows:
        print(f"{r['cells']:8d} {r['chunks']:6d} {r['input_mib']:9.1f} {r['output_mib']:10.1f} "
              f"{r['seconds']:7.1f} {r['cells'] / r['seconds']:8.0f} {r['before']:14.0f} {r['peak']:12.0f} "
              f"{r['peak'] - r['before']:13.0f}")
    if len(rows) == 2:
        print(f"peak RSS {rows[1]['cells']:,} vs {rows[0]['cells']:,} cells: "
              f"{(rows[1]['peak'] / rows[0]['peak'] - 1) * 100:+.1f} %")

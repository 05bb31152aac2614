"""Corpus at scale (docs/scaling.md): `cellfm corpus build` rate and bytes per cell on real cells,
and the pretraining loader's cells/s with 0 and 2 workers, with its memory over the epoch.

1. builds a corpus from the real full-transcriptome files in the data folder (bytes per cell);
2. writes an .h5ad of N cells with real sparsity: the real PBMCs of pbmc4k repeated row after
   row (raw counts, all 33,694 genes), in row chunks, so N can exceed memory;
3. times `cellfm corpus build` on it (a subprocess, 1 worker: the rate of one input file);
4. times `CorpusDataset` (main process) and `CorpusLoader` (2 workers) on the built corpus:
   cells/s of tokenized, masked 256-cell batches, and the main process's resident memory after
   the first batches and at the end, split into anonymous memory (flat: the loader holds no more
   as it goes) and mapped shard pages (page cache, grows with the cells read, reclaimable).

    python benchmarks/corpus_scale.py --data-dir ../shared/data --cells 100000 --dir /tmp/cs
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from real_cells import PBMC, data_dir

REAL = [PBMC, "celltypist_sample/celltypist_sample_559cells.h5ad"]


def build(inputs: list[Path], out: Path) -> tuple[float, float]:
    """(seconds, peak RSS MiB of the build process) of `cellfm corpus build -j 1`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cellfm.cli", "corpus", "build", *map(str, inputs), "-o", str(out),
                    "-j", "1"], check=True, stdout=subprocess.DEVNULL)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return time.perf_counter() - t, max(peak, before) / 1024


def corpus_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def n_cells(folder: Path) -> int:
    from cellfm.corpus import CorpusManifest

    return CorpusManifest.load(folder).n_cells


def write_tiled(src: Path, path: Path, n: int, chunk: int = 20_000) -> None:
    """N rows of real cells (src's rows repeated) as a backed-readable .h5ad, chunk by chunk."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import write_elem

    real = ad.read_h5ad(src)
    X = sp.csr_matrix(real.X)
    with h5py.File(path, "w") as f:
        write_elem(f, "obs", pd.DataFrame(index=[f"c{i}" for i in range(n)]))
        write_elem(f, "var", pd.DataFrame(index=real.var_names.astype(str)))
        for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, name, {})
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        for a in range(0, n, chunk):
            block = X[np.arange(a, min(n, a + chunk)) % X.shape[0]]
            if a == 0:
                write_elem(f, "X", block)
            else:
                ad.io.sparse_dataset(f["X"]).append(block)


def rss_parts() -> tuple[float, float]:
    """(anonymous, file-backed) resident MiB of this process: mapped shard pages are file-backed
    page cache the kernel can drop, anonymous memory is what the loader really holds."""
    parts = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            parts[key] = int(value.split()[0]) / 1024
    return parts["RssAnon"], parts["RssFile"]


def loader_rate(folder: Path, workers: int, batches: int, batch: int = 256) -> tuple[float, tuple, tuple]:
    """(cells/s, (anon, file) RSS MiB after 5 batches, the same at the end) of `batches` batches."""
    from cellfm.corpus import CorpusDataset, CorpusLoader

    ds = CorpusDataset(folder, seed=0, epoch=0, batch_size=batch)
    it = iter(ds) if workers == 0 else iter(CorpusLoader(ds, num_workers=workers))
    for _ in range(5):
        next(it)
    early = rss_parts()
    t = time.perf_counter()
    cells = sum(len(next(it)) for _ in range(batches))
    rate = cells / (time.perf_counter() - t)
    late = rss_parts()
    del it
    return rate, early, late


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="the shared data folder (default: $CELLFM_DATA_DIR)")
    p.add_argument("--cells", type=int, default=100_000, help="cells of the tiled real-sparsity file")
    p.add_argument("--dir", type=Path, default=Path("/tmp/cellfm-corpus-scale"))
    p.add_argument("--batches", type=int, default=200, help="256-cell batches timed per loader row")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    data = data_dir(args.data_dir)
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)

    real_out = args.dir / "real_corpus"
    secs, _ = build([data / r for r in REAL], real_out)
    nc, nb = n_cells(real_out), corpus_bytes(real_out)
    print(f"real files ({', '.join(REAL)}): {nc} cells kept, {nb / 2**20:.1f} MiB, "
          f"{nb / nc:,.0f} bytes a cell, built in {secs:.1f} s")

    src = args.dir / "tiled.h5ad"
    t = time.perf_counter()
    write_tiled(data / PBMC, src, args.cells)
    print(f"tiled real cells: {args.cells:,} rows, {src.stat().st_size / 2**30:.2f} GiB .h5ad, written in "
          f"{time.perf_counter() - t:.0f} s")
    out = args.dir / "tiled_corpus"
    secs, peak = build([src], out)
    nc, nb = n_cells(out), corpus_bytes(out)
    print(f"cellfm corpus build -j 1: {nc:,} cells in {secs:.0f} s = {nc / secs:,.0f} cells/s, "
          f"{nb / 2**30:.2f} GiB = {nb / nc:,.0f} bytes a cell, peak RSS {peak:,.0f} MiB")

    print(f"\n| loader ({args.batches} batches of 256) | cells/s | main process RSS MiB after 5 batches: "
          "anonymous + mapped shard pages | at the end |")
    print("|---|---|---|---|")
    for workers in (0, 2):
        rate, early, late = loader_rate(out, workers, args.batches)
        print(f"| {workers} workers | {rate:,.0f} | {early[0]:,.0f} + {early[1]:,.0f} | "
              f"{late[0]:,.0f} + {late[1]:,.0f} |", flush=True)
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()

"""Pretraining batches per second from our Arrow shards vs straight from SOMA (TileDB-SOMA-ML),
on the same cells, with the same batch size and tokenization; prints one table.

    python benchmarks/soma_loader.py                      # a local experiment of real cells (../shared/data)
    python benchmarks/soma_loader.py --soma PATH_OR_URI   # your own experiment (raw counts in X/raw)
    python benchmarks/soma_loader.py --copies 8 --workers 0 2

The cells are written once as a SOMA experiment (`--copies` repeats the real cells to get more
rows), imported with `build_corpus_from_soma` (timed: the one-off cost of the shard path), then
one epoch is read by `CorpusLoader` and by `SomaStreamLoader` after one warm-up batch (the SOMA
path's first batch includes numba compiling tiledbsoma-ml's CSR code, reported apart as start).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from cellfm.corpus import CorpusDataset, CorpusLoader
from cellfm.corpus.soma import SomaQuery
from cellfm.corpus.soma_build import build_corpus_from_soma
from cellfm.corpus.soma_stream import SomaStreamDataset, SomaStreamLoader

REPO = Path(__file__).resolve().parents[1]


def _experiment(tmp: Path, data: Path, copies: int) -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from soma_experiment import cells_for_soma, write_soma_experiment

    cells = cells_for_soma(data)
    if copies > 1:
        cells = ad.concat([cells] * copies, index_unique="-")
        cells.X = sp.csr_matrix(cells.X, dtype=np.float32)
        cells.var = cells_for_soma(data).var
    return str(write_soma_experiment(cells, tmp / "exp"))


def _epoch(loader) -> tuple[float, float, int, int, float]:
    """(start s, steady s, cells, tokens, first-batch s) of one pass."""
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    t1 = time.perf_counter()
    cells, tokens = 0, 0
    for b in it:
        cells += len(b.cell_index)
        tokens += int(b.token_mask.sum())
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, cells, tokens, len(first.cell_index)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--soma", help="SOMA experiment (default: one written from ../shared/data)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--copies", type=int, default=4, help="repeat the 720 real cells this many times")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        uri = args.soma or _experiment(tmp, Path(args.data), args.copies)
        q = SomaQuery(uri=uri)
        t = time.perf_counter()
        m = build_corpus_from_soma(q, tmp / "corpus", max_genes=None, min_genes=200, workers=1,
                                   shard_cells=100_000, progress=False)
        build_s = time.perf_counter() - t
        print(f"cells: {m.n_cells} kept of {m.report.iloc[0]['cells_read']} in {uri}; batch size "
              f"{args.batch_size}; import into shards once: {build_s:.1f} s "
              f"({m.n_cells / build_s:,.0f} cells/s, 1 process)")
        print(f"{'source':<28}{'workers':>8}{'start s':>9}{'cells/s':>11}{'tokens/s':>13}{'cells':>8}")
        for w in args.workers:
            for name in ("arrow shards (CorpusLoader)", "SOMA (tiledbsoma-ml)"):
                if name.startswith("arrow"):
                    ds = CorpusDataset(tmp / "corpus", batch_size=args.batch_size)
                    loader = CorpusLoader(ds, num_workers=w)
                else:
                    loader = SomaStreamLoader(SomaStreamDataset(q, batch_size=args.batch_size), num_workers=w)
                start, steady, cells, tokens, first = _epoch(loader)
                print(f"{name:<28}{w:>8}{start:>9.1f}{cells / steady:>11,.0f}{tokens / steady:>13,.0f}"
                      f"{cells + first:>8}")


if __name__ == "__main__":
    main()

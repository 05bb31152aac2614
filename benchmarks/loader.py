"""Corpus loader throughput: raw shard reads and tokenized, masked batches per second.

Writes a synthetic corpus (default 200k cells x ~1.8k expressed genes, with the real shard writer
and manifest) and times
  1. raw shard reads: random 256-cell batches from memory-mapped shards (`ShardReader.take`);
  2. tokenized + masked `CellBatch`es from `CorpusDataset` in the main process (one core);
  3. the same through `CorpusLoader` with 1 and 2 DataLoader workers.
Timings are with the shards in the page cache (the corpus was just written).

    python benchmarks/loader.py --cells 200000 --dir /tmp/cellfm-bench
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from cellfm.corpus import CorpusDataset, CorpusLoader, CorpusManifest, ShardInfo, ShardReader
from cellfm.corpus.shards import CellRows, ShardWriter

N_GENES = 27855


def write_synthetic_corpus(out: Path, n_cells: int, mean_genes: int = 1800, shard_cells: int = 50_000,
                           chunk: int = 4096, seed: int = 0) -> CorpusManifest:
    """Cells with sorted distinct gene ids (random gaps from a random start) and small counts."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, "synthetic", shard_cells)
    for a in range(0, n_cells, chunk):
        n = min(chunk, n_cells - a)
        lens = rng.integers(mean_genes - 300, min(2048, mean_genes + 300) + 1, n)  # (n,)
        indptr = np.concatenate([[0], np.cumsum(lens)])
        gaps = rng.integers(1, 14, int(indptr[-1]))  # mean gap 7: a cell spans <= 13 * 2048 ids
        gaps[indptr[:-1]] = rng.integers(1, N_GENES - 13 * lens + 1)  # random start per cell
        run = np.cumsum(gaps)
        ids = run - np.repeat(run[indptr[:-1]] - gaps[indptr[:-1]], lens)  # start + gaps within the cell
        counts = rng.geometric(0.35, int(indptr[-1])).astype(np.uint32)
        cells = [f"c{i}" for i in range(a, a + n)]
        writer.write(CellRows(indptr=indptr, gene_ids=ids.astype(np.uint16), counts=counts, cell_id=cells,
                              source_row=np.arange(a, a + n), batch=["synthetic"] * n, labels=[{}] * n,
                              raw_total=np.zeros(n, np.float32), source="synthetic"))
    shards = writer.close()
    m = CorpusManifest(vocabulary={"name": "synthetic", "n_genes": N_GENES, "sha256": ""},
                       filters={"min_genes": 0, "max_genes": 2048},
                       shards=[ShardInfo(f, c, h, "synthetic") for f, c, h in shards])
    m.save(out)
    return m


def time_raw(folder: Path, m: CorpusManifest, batch: int, n_batches: int) -> float:
    readers = [ShardReader(folder / s.file) for s in m.shards]
    rng = np.random.default_rng(1)
    t = time.perf_counter()
    for _ in range(n_batches):
        r = readers[rng.integers(len(readers))]
        r.take(rng.integers(0, len(r), batch))
    return batch * n_batches / (time.perf_counter() - t)


def time_tokenized(folder: Path, batch: int, n_batches: int, workers: int | None) -> float:
    ds = CorpusDataset(folder, seed=0, epoch=0, batch_size=batch)
    it = iter(ds) if workers is None else iter(CorpusLoader(ds, num_workers=workers))
    next(it)  # start-up (worker spawn, first maps) is not throughput
    t = time.perf_counter()
    cells = 0
    for _ in range(n_batches):
        cells += len(next(it))
    rate = cells / (time.perf_counter() - t)
    del it
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=200_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/cellfm-loader-bench"))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=100, help="batches timed per measurement")
    ap.add_argument("--keep", action="store_true", help="keep the corpus folder afterwards")
    args = ap.parse_args()

    if args.dir.exists():
        shutil.rmtree(args.dir)
    t = time.perf_counter()
    m = write_synthetic_corpus(args.dir, args.cells)
    size = sum((args.dir / s.file).stat().st_size for s in m.shards) / 2**30
    print(f"synthetic corpus: {m.n_cells} cells in {len(m.shards)} shards, {size:.2f} GiB, "
          f"written in {time.perf_counter() - t:.1f} s")

    b, nb = args.batch, args.batches
    rows = [
        (f"raw shard read, random {b}-cell batches", time_raw(args.dir, m, b, nb * 4)),
        ("tokenized + masked, main process (1 core)", time_tokenized(args.dir, b, nb, None)),
        ("tokenized + masked, 1 DataLoader worker", time_tokenized(args.dir, b, nb, 1)),
        ("tokenized + masked, 2 DataLoader workers", time_tokenized(args.dir, b, nb, 2)),
    ]
    print(f"\n| {'measurement':45s} | {'cells/s':>10s} |\n|{'-' * 47}|{'-' * 12}|")
    for name, rate in rows:
        print(f"| {name:45s} | {rate:10,.0f} |")
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()

"""Corpus loader throughput: raw shard reads and tokenized, masked batches per second.

Writes a synthetic corpus (default 200k cells x ~1.8k expressed genes, with the real shard writer
and manifest) and times
  1. raw shard reads: random 256-cell batches from memory-mapped shards (`ShardReader.take`);
  2. tokenized + masked `CellBatch`es from `CorpusDataset` in the main process (one core), with
     glibc's default malloc and after `keep_freed_memory()` (what loader workers use);
  3. the same through `CorpusLoader` with 1 and 2 DataLoader workers;
  4. for reference, what the DataLoader alone costs to pass a ready batch from a worker (shared
     memory; a padded 256 x 2048 batch is ~7.5 MB).
Timings are with the shards in the page cache (the corpus was just written).

    python benchmarks/loader.py --cells 200000 --dir /tmp/cellfm-bench
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from cellfm.batch import CellBatch
from cellfm.corpus import CorpusDataset, CorpusLoader, CorpusManifest, ShardInfo, ShardReader
from cellfm.corpus.loader import keep_freed_memory
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


class _Repeat(torch.utils.data.IterableDataset):
    """The same batch n times: what a DataLoader worker costs to hand over a batch, no work."""

    def __init__(self, batch, n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self):
        for _ in range(self.n):  # fresh tensors each time, as the real loader makes
            yield CellBatch(**{f.name: None if getattr(self.batch, f.name) is None
                               else getattr(self.batch, f.name).clone() for f in fields(CellBatch)})


def time_transfer(folder: Path, batch: int, n_batches: int) -> float:
    b = next(iter(CorpusDataset(folder, seed=0, epoch=0, batch_size=batch)))
    dl = torch.utils.data.DataLoader(_Repeat(b, n_batches + 1), batch_size=None, num_workers=1)
    it = iter(dl)
    next(it)
    t = time.perf_counter()
    cells = sum(len(x) for x in it)
    return cells / (time.perf_counter() - t)


def _after_keep_freed(folder: Path, batch: int, n_batches: int) -> float:
    keep_freed_memory()
    return time_tokenized(folder, batch, n_batches, None)


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
        ("  same, after keep_freed_memory()", _after_keep_freed(args.dir, b, nb)),
        ("tokenized + masked, 1 DataLoader worker", time_tokenized(args.dir, b, nb, 1)),
        ("tokenized + masked, 2 DataLoader workers", time_tokenized(args.dir, b, nb, 2)),
        ("DataLoader hand-over only (1 worker, no work)", time_transfer(args.dir, b, nb)),
    ]
    print(f"\n| {'measurement':45s} | {'cells/s':>10s} |\n|{'-' * 47}|{'-' * 12}|")
    for name, rate in rows:
        print(f"| {name:45s} | {rate:10,.0f} |")
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()

"""Arrow IPC shard files: the on-disk row format of a corpus, its writer and a memory-mapped reader.

One row per cell. `gene_ids` (list<uint16>, sorted vocabulary token ids of the expressed matched
genes) and `counts` (list<uint32>, the library-scaled counts `round(count / max(1, total / 1e5))`
of the official preprocessing, where `total` sums ALL genes of the source file, matched or not).
Scaled counts are stored, not raw ones, because the scale factor needs the unmatched genes, which
a shard no longer has; the loader's total is the sum of the stored counts, exactly as the official
`SCrna.T`. Metadata columns (cell id, source row, batch, labels, split hash, raw total) ride in the
same file; a reader that asks only for the list columns never touches their pages.

This module knows nothing about vocabularies or input formats.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

GENE_ID_DTYPE = np.uint16  # holds token ids up to 65,535; the 27,855-gene vocabulary fits
COUNT_DTYPE = np.uint32  # scaled counts are integers <= 1e5 (uint16 would overflow)

SHARD_SCHEMA = pa.schema(
    [
        pa.field("gene_ids", pa.list_(pa.uint16())),
        pa.field("counts", pa.list_(pa.uint32())),
        pa.field("cell_id", pa.string()),
        pa.field("source_row", pa.int64()),
        pa.field("batch", pa.string()),
        pa.field("labels", pa.map_(pa.string(), pa.string())),
        pa.field("split_hash", pa.uint64()),
        pa.field("raw_total", pa.float32()),
    ]
)


@dataclass
class CellRows:
    """A block of cells in flat (CSR-like) form, ready to become one Arrow record batch."""

    indptr: np.ndarray  # (n + 1,) int64 offsets into gene_ids / counts
    gene_ids: np.ndarray  # (nnz,) uint16, sorted within each cell
    counts: np.ndarray  # (nnz,) uint32 scaled counts
    cell_id: Sequence[str]  # (n,)
    source_row: np.ndarray  # (n,) int64 row in the source file
    batch: Sequence[str]  # (n,)
    labels: list[dict[str, str]]  # (n,) label columns as strings
    raw_total: np.ndarray  # (n,) float32 total over all genes of the source, before scaling
    source: str = ""

    def __len__(self) -> int:
        return len(self.indptr) - 1


def split_hash(source: str, cell_ids: Sequence[str]) -> np.ndarray:
    """A stable 64-bit hash of (source file name, cell id) per cell, for held-out splits."""
    out = np.empty(len(cell_ids), np.uint64)
    for i, c in enumerate(cell_ids):
        d = hashlib.blake2b(f"{source}\x1f{c}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(d, "little")
    return out


def _record_batch(rows: CellRows) -> pa.RecordBatch:
    offsets = pa.array(rows.indptr.astype(np.int32))
    gene_ids = pa.ListArray.from_arrays(offsets, pa.array(rows.gene_ids.astype(GENE_ID_DTYPE)))
    counts = pa.ListArray.from_arrays(offsets, pa.array(rows.counts.astype(COUNT_DTYPE)))
    labels = pa.array([list(d.items()) for d in rows.labels], type=SHARD_SCHEMA.field("labels").type)
    return pa.RecordBatch.from_arrays(
        [
            gene_ids,
            counts,
            pa.array(list(rows.cell_id), pa.string()),
            pa.array(rows.source_row.astype(np.int64)),
            pa.array(list(rows.batch), pa.string()),
            labels,
            pa.array(split_hash(rows.source, rows.cell_id)),
            pa.array(rows.raw_total.astype(np.float32)),
        ],
        schema=SHARD_SCHEMA,
    )


class ShardWriter:
    """Writes cells into numbered shard files of at most `shard_cells` rows each.

    Files are written under a temporary name and renamed when closed, so a crash never leaves a
    half-written file under a final name. `finished` lists (file name, n_cells, sha256).
    """

    def __init__(self, out_dir: Path, prefix: str, shard_cells: int = 100_000, source: str = "") -> None:
        self.out_dir = Path(out_dir)
        self.schema = SHARD_SCHEMA.with_metadata({"source": source}) if source else SHARD_SCHEMA
        self.prefix = prefix
        self.shard_cells = shard_cells
        self.finished: list[tuple[str, int, str]] = []
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._tmp: Path | None = None
        self._n = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.finished):04d}.arrow"
        self._tmp = self.out_dir / f".{name}.tmp"
        self._writer = pa.ipc.new_file(str(self._tmp), self.schema)
        self._n = 0

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        assert self._tmp is not None
        final = self.out_dir / self._tmp.name[1:-4]
        self._tmp.rename(final)
        self.finished.append((final.name, self._n, file_sha256(final)))
        self._writer = None

    def write(self, rows: CellRows) -> None:
        start = 0
        while start < len(rows):
            if self._writer is None:
                self._open()
            take = min(len(rows) - start, self.shard_cells - self._n)
            part = _slice_rows(rows, start, start + take)
            self._writer.write_batch(_record_batch(part))  # type: ignore[union-attr]
            self._n += take
            start += take
            if self._n >= self.shard_cells:
                self._close()

    def close(self) -> list[tuple[str, int, str]]:
        self._close()
        return self.finished

    def abort(self) -> None:
        """Remove everything this writer produced (used when its input turns out to be bad)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
        for name, _, _ in self.finished:
            (self.out_dir / name).unlink(missing_ok=True)
        self.finished = []


def _slice_rows(rows: CellRows, a: int, b: int) -> CellRows:
    if a == 0 and b == len(rows):
        return rows
    lo, hi = rows.indptr[a], rows.indptr[b]
    return CellRows(
        indptr=rows.indptr[a : b + 1] - lo,
        gene_ids=rows.gene_ids[lo:hi],
        counts=rows.counts[lo:hi],
        cell_id=rows.cell_id[a:b],
        source_row=rows.source_row[a:b],
        batch=rows.batch[a:b],
        labels=rows.labels[a:b],
        raw_total=rows.raw_total[a:b],
        source=rows.source,
    )


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), vectorised: (sum(lengths),) int64."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(lengths)
    shift = np.asarray(starts, np.int64) - (ends - lengths)  # per range: start - its output offset
    return np.arange(total, dtype=np.int64) + np.repeat(shift, lengths)


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class ShardReader:
    """Memory-mapped random access to the list columns of one shard.

    Only the pages of the requested rows are read. `take(rows)` returns the cells as flat arrays
    (offsets + values), vectorised over the whole request — no per-cell Python.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._reader = pa.ipc.open_file(pa.memory_map(str(self.path), "r"))
        ids, cnts, offs, starts = [], [], [], [0]
        for i in range(self._reader.num_record_batches):
            rb = self._reader.get_batch(i)
            g = rb.column(0)
            c = rb.column(1)
            offs.append(g.offsets.to_numpy().astype(np.int64))  # (n_b + 1,)
            ids.append(g.values.to_numpy())  # zero-copy view of the mapped file
            cnts.append(c.values.to_numpy())
            starts.append(starts[-1] + len(rb))
        self._offsets, self._ids, self._counts = offs, ids, cnts
        self._starts = np.asarray(starts, np.int64)  # (n_batches + 1,) first row of each batch
        self.n_cells = int(self._starts[-1])

    def __len__(self) -> int:
        return self.n_cells

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cells `rows` (in that order) -> (indptr (n+1,) int64, gene_ids (nnz,) uint16,
        counts (nnz,) uint32)."""
        rows = np.asarray(rows, np.int64)
        which = np.searchsorted(self._starts, rows, side="right") - 1  # (n,) record batch per row
        local = rows - self._starts[which]
        ids, cnts = [], []
        lengths = np.empty(len(rows), np.int64)
        # one slice per cell: copying contiguous runs beats any fancy-index gather here
        for k, (b, r) in enumerate(zip(which.tolist(), local.tolist(), strict=True)):
            off = self._offsets[b]
            s, e = off[r], off[r + 1]
            lengths[k] = e - s
            ids.append(self._ids[b][s:e])
            cnts.append(self._counts[b][s:e])
        indptr = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=indptr[1:])
        if not ids:
            return indptr, np.zeros(0, GENE_ID_DTYPE), np.zeros(0, COUNT_DTYPE)
        gene_ids = np.concatenate(ids)
        counts = np.concatenate(cnts)
        return indptr, gene_ids, counts

    def expressed_genes(self) -> np.ndarray:
        """Sorted gene ids expressed in at least one cell of the shard (one pass over its ids)."""
        seen = np.zeros(np.iinfo(GENE_ID_DTYPE).max + 1, bool)
        for ids in self._ids:
            seen[ids] = True
        return np.flatnonzero(seen[1:]) + 1  # id 0 is padding

    def column(self, name: str) -> pa.ChunkedArray:
        """A whole metadata column (small: one value per cell)."""
        return pa.chunked_array([self._reader.get_batch(i).column(name)
                                 for i in range(self._reader.num_record_batches)])

    def read_table(self) -> pa.Table:
        """The whole shard as a table (tests and `cellfm corpus info`; not for training)."""
        return self._reader.read_all()

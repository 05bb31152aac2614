"""`CorpusDataset`: streams tokenized, masked `CellBatch`es from a corpus folder for pretraining.

Never loads a shard: shards are memory-mapped and each batch reads only its rows. The epoch plan
(`epoch_plan`) fixes which cells go into which batch on which rank; DataLoader workers take the
rank's batches round-robin, which is the order the DataLoader returns them in, so the stream is
the same for any number of workers. Each cell's random generator comes from (seed, epoch, global
cell index), so its 2048-gene sample and its mask do not depend on workers or ranks either.

Tokenization follows the official pretraining (`cellfm.tokenizer`): value = log1p(count / total
* 1e4) with total = the cell's sum of stored (library-scaled) counts; cells with more than
`max_genes` expressed genes are sampled by `tokenize_cell`; masks come from `mask_values`.
The value computation is vectorised over the batch (cells that need no sampling use no
randomness, and the test suite checks the batch equals the per-cell functions); `mask_values`
runs per cell with its own generator.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cellfm.batch import CellBatch
from cellfm.corpus.epoch_plan import (
    batch_bounds,
    cell_states,
    set_pcg_state,
    shard_order,
    window_order,
)
from cellfm.corpus.manifest import CorpusManifest
from cellfm.corpus.shards import ShardReader, concat_ranges
from cellfm.tokenizer import mask_values, tokenize_cell

_OPEN_SHARDS = 8  # memory maps kept open per worker (or mix_shards, if more)


class CorpusDataset(IterableDataset):
    """Pretraining batches from a corpus built by `build_corpus`.

    Parameters
    ----------
    corpus_dir
        Folder with `manifest.json` and the shards.
    seed, epoch
        The epoch's cell order and every cell's random draws are functions of these.
    rank, world_size
        This process's share: every rank gets the same number of batches (see `epoch_plan`).
    batch_size
        Cells per batch (with ``tail="even"`` a batch may hold one cell fewer).
    max_genes, mask_ratio, hide_fraction
        Official pretraining values: at most 2048 expressed genes per cell; 20 % of them in the
        loss, 80 % of those hidden from the encoder.
    split, val_fraction
        ``"train"`` / ``"val"``: a deterministic held-out split by a hash of (source file, cell id)
        stored in the shards; a cell is in ``"val"`` when hash / 2**64 < val_fraction.
        ``"all"`` ignores the split.
    mask
        False: no pretraining masks (hidden_mask / loss_mask are None), e.g. for evaluation.
    tail
        ``"even"`` or ``"drop"``, see `epoch_plan`.
    mix_shards
        Cells of this many shards are shuffled together (see `epoch_plan`); 1 = one shard at a
        time (each batch from one source file).
    unexpressed_ratio
        Not official (0 = off): per cell, round(ratio x its loss positions) genes that the cell
        does not express but its shard expresses somewhere join the batch as hidden loss tokens
        with value 0. Expressed genes are the only tokens otherwise, so which genes are on is
        never a target; with these the model must tell on from off, the signal that carries cell
        identity. Drawn after the masks from the cell's own generator.

    Use ``batch_size=None`` in the DataLoader (batches are built here), or `CorpusLoader`, which
    also tracks the position for `state_dict`. `len()` is the number of batches this rank still
    yields in the current epoch.

    Examples
    --------
    >>> ds = CorpusDataset("corpus/", seed=0, epoch=0, rank=0, world_size=1, batch_size=64)  # doctest: +SKIP
    >>> batch = next(iter(ds))  # doctest: +SKIP
    """

    def __init__(
        self,
        corpus_dir: str | Path,
        *,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 32,
        max_genes: int = 2048,
        mask_ratio: float = 0.2,
        hide_fraction: float = 0.8,
        split: str = "all",
        val_fraction: float = 0.0,
        mask: bool = True,
        tail: str = "even",
        mix_shards: int = 16,
        unexpressed_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        if mix_shards < 1:
            raise ValueError(f"mix_shards must be >= 1, got {mix_shards}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if split not in ("all", "train", "val"):
            raise ValueError(f"split must be all, train or val, not {split!r}")
        self.dir = Path(corpus_dir)
        self.manifest = CorpusManifest.load(self.dir)
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.batch_size, self.max_genes, self.tail = batch_size, max_genes, tail
        self.mask_ratio, self.hide_fraction, self.mask = mask_ratio, hide_fraction, mask
        self.split, self.val_fraction, self.mix_shards = split, val_fraction, mix_shards
        if unexpressed_ratio < 0 or (unexpressed_ratio > 0 and not mask):
            raise ValueError(f"unexpressed_ratio={unexpressed_ratio} needs mask=True and a value >= 0")
        self.unexpressed_ratio = unexpressed_ratio
        self._pools: dict[int, np.ndarray] = {}  # shard -> genes it expresses (unexpressed_ratio)
        self.files = [self.dir / s.file for s in self.manifest.shards]
        sizes = np.array([s.n_cells for s in self.manifest.shards], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # global cell index of row 0
        # rows of each shard taking part (None = all), for the held-out split
        self.selected: list[np.ndarray | None] = [None] * len(self.files)
        if split != "all":
            limit = np.uint64(min(int(val_fraction * 2**64), 2**64 - 1))
            for i, f in enumerate(self.files):
                h = ShardReader(f).column("split_hash").to_numpy()
                in_val = h < limit
                self.selected[i] = np.flatnonzero(in_val if split == "val" else ~in_val)
            sizes = np.array([len(s) for s in self.selected], np.int64)
        self.sizes = sizes  # (n_shards,) cells taking part per shard
        self.start_batch = 0
        self._readers: OrderedDict[int, ShardReader] = OrderedDict()
        self._perm_cache: tuple[int, int, np.ndarray, np.ndarray] | None = None

    # ---- position -------------------------------------------------------------------------
    @property
    def n_cells(self) -> int:
        return int(self.sizes.sum())

    @property
    def batches_per_rank(self) -> int:
        return (len(batch_bounds(self.n_cells, self.world_size, self.batch_size, self.tail)) - 1) \
            // self.world_size

    def __len__(self) -> int:
        return self.batches_per_rank - self.start_batch

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (resets a resumed position)."""
        self.epoch, self.start_batch = epoch, 0

    def state_dict(self, batches_consumed: int | None = None) -> dict:
        """The position to resume from: epoch and batches of this rank already consumed."""
        return {"epoch": self.epoch, "batches_consumed": self.start_batch if batches_consumed is None
                else batches_consumed, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "n_cells": self.n_cells}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "world_size", "batch_size", "n_cells"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"cannot resume: {k}={state[k]} in the state, {getattr(self, k)} here")
        self.epoch, self.start_batch = int(state["epoch"]), int(state["batches_consumed"])

    def __getstate__(self) -> dict:
        """Worker copies reopen their memory maps (maps cannot be pickled under spawn)."""
        state = self.__dict__.copy()
        state["_readers"], state["_perm_cache"], state["_pools"] = OrderedDict(), None, {}
        return state

    # ---- iteration ------------------------------------------------------------------------
    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        bounds = batch_bounds(self.n_cells, self.world_size, self.batch_size, self.tail)
        order = shard_order(self.seed, self.epoch, len(self.files))
        for i in range(self.start_batch + wid, self.batches_per_rank, nw):
            k = i * self.world_size + self.rank
            yield self.make_batch(int(bounds[k]), int(bounds[k + 1]), order)

    def _window_ends(self, order: np.ndarray) -> np.ndarray:
        """(n_windows,) stream position where each window of `mix_shards` shards ends."""
        return np.cumsum(np.add.reduceat(self.sizes[order], np.arange(0, len(order), self.mix_shards)))

    def cells_at(self, a: int, b: int, order: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Stream positions [a, b) -> [(shard, rows)], grouped by shard (rows in stream order)."""
        ends = self._window_ends(order)
        out = []
        w = int(np.searchsorted(ends, a, side="right"))
        while a < b:
            begin, stop = int(ends[w - 1]) if w else 0, min(b, int(ends[w]))
            window = order[w * self.mix_shards : (w + 1) * self.mix_shards]  # shards of window w
            starts = np.concatenate([[0], np.cumsum(self.sizes[window])])
            slot, perm = self._window_perm(w, starts)
            pos = perm[a - begin : stop - begin]  # (n,) positions among the window's cells
            which = slot[pos]
            for j in np.unique(which):
                rows = pos[which == j] - starts[j]
                shard = int(window[j])
                sel = self.selected[shard]
                out.append((shard, rows if sel is None else sel[rows]))
            a, w = stop, w + 1
        return out

    def _window_perm(self, w: int, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard slot of each of the window's cells, their permutation), cached per window."""
        c = self._perm_cache
        if c is None or c[0] != w or c[1] != self.epoch:
            slot = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
            c = (w, self.epoch, slot, window_order(self.seed, self.epoch, w, int(starts[-1])))
            self._perm_cache = c
        return c[2], c[3]

    def _reader(self, shard: int) -> ShardReader:
        r = self._readers.get(shard)
        if r is None:
            r = ShardReader(self.files[shard])
            self._readers[shard] = r
            if len(self._readers) > max(_OPEN_SHARDS, self.mix_shards):
                self._readers.popitem(last=False)
        else:
            self._readers.move_to_end(shard)
        return r

    def read_cells(self, a: int, b: int, order: np.ndarray):
        """Stream positions [a, b) -> (global cell index (n,), indptr (n+1,), gene_ids, counts,
        shard of each cell (n,))."""
        parts = [(self.offsets[s] + rows, *self._reader(s).take(rows), np.full(len(rows), s))
                 for s, rows in self.cells_at(a, b, order)]
        if len(parts) == 1:
            return parts[0]
        idx = np.concatenate([p[0] for p in parts])
        lens = np.concatenate([np.diff(p[1]) for p in parts])
        indptr = np.concatenate([[0], np.cumsum(lens)])
        return (idx, indptr, np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]),
                np.concatenate([p[4] for p in parts]))

    def _pool(self, shard: int) -> np.ndarray:
        if shard not in self._pools:
            self._pools[shard] = self._reader(shard).expressed_genes()
        return self._pools[shard]

    def make_batch(self, a: int, b: int, order: np.ndarray) -> CellBatch:
        cell_index, indptr, gene_ids, counts, shard = self.read_cells(a, b, order)
        pools = [self._pool(int(s)) for s in shard] if self.unexpressed_ratio else None
        return tokenize_batch(cell_index, indptr, gene_ids, counts, seed=self.seed, epoch=self.epoch,
                              max_genes=self.max_genes, mask=self.mask, mask_ratio=self.mask_ratio,
                              hide_fraction=self.hide_fraction, unexpressed_ratio=self.unexpressed_ratio,
                              pools=pools)


def unexpressed_sample(pool: np.ndarray, expressed: np.ndarray, k: int, rng: np.random.Generator
                       ) -> np.ndarray:
    """Up to k distinct genes of the sorted `pool` that are not in `expressed`."""
    off = np.setdiff1d(pool, expressed, assume_unique=False)
    if len(off) <= k:
        return off
    return np.sort(off[rng.choice(len(off), k, replace=False)])


_TABLE = 64  # counts below this are looked up in a per-cell table of values


def cell_values(counts: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """log1p(count / total * 1e4) as float32 for a padded (B, L) integer count array.

    Counts are small integers, so each cell's values for counts 0..63 are computed once into a
    table and gathered (log1p is the costly part: ~25 ns per float64); larger counts are computed
    directly. Same float64 operations on the same inputs as elementwise, so bitwise the same.
    """
    n, L = counts.shape
    safe = np.where(totals > 0, totals, 1.0)[:, None]  # (B, 1)
    table = np.log1p(np.arange(_TABLE, dtype=np.float64)[None, :] / safe * 1e4).astype(np.float32)
    idx = np.minimum(counts, _TABLE - 1).astype(np.int32)  # (B, L)
    idx += (np.arange(n, dtype=np.int32) * _TABLE)[:, None]
    out = np.take(table.reshape(-1), idx)  # (B, L)
    big = counts >= _TABLE - 1
    if big.any():
        rows = np.nonzero(big)[0]
        out[big] = np.log1p(counts[big].astype(np.float64) / safe[rows, 0] * 1e4).astype(np.float32)
    return out


def tokenize_batch(
    cell_index: np.ndarray,
    indptr: np.ndarray,
    gene_ids: np.ndarray,
    counts: np.ndarray,
    *,
    seed: int,
    epoch: int,
    max_genes: int = 2048,
    mask: bool = True,
    mask_ratio: float = 0.2,
    hide_fraction: float = 0.8,
    unexpressed_ratio: float = 0.0,
    pools: list[np.ndarray] | None = None,
) -> CellBatch:
    """Flat cells (CSR-like) -> CellBatch, as `tokenize_cell` + `mask_values` per cell with the
    generator `cell_generator(seed, epoch, cell_index[i])`, then padding to the longest cell.

    With `unexpressed_ratio`, cell i also gets unexpressed genes drawn from `pools[i]` after its
    real tokens: hidden, in the loss, value 0 (see `CorpusDataset`)."""
    n = len(cell_index)
    lens = np.diff(indptr)  # (n,)
    totals = np.add.reduceat(counts, indptr[:-1], dtype=np.float64) if len(counts) else np.zeros(n)
    totals[lens == 0] = 0.0  # reduceat quirk: an empty cell would get its neighbour's value
    is_long = lens > max_genes
    out_lens = np.minimum(lens, max_genes)
    n_off = np.zeros(n, np.int64)  # unexpressed genes added per cell (loss positions x ratio)
    if mask and unexpressed_ratio:
        n_off = np.round(unexpressed_ratio * (mask_ratio * out_lens).astype(np.int64)).astype(np.int64)
    L = int((out_lens + n_off).max()) if n else 0
    token_mask = np.arange(L)[None, :] < out_lens[:, None]  # (B, L)
    ids_t = np.zeros((n, L), np.int64)  # (B, L)
    cnt_t = np.zeros((n, L), np.int32)  # (B, L) integer scaled counts (<= 1e5)
    # cells that fit: all at once (a boolean-mask assignment fills row-major, i.e. cell by cell)
    if is_long.any():
        fit = concat_ranges(indptr[:-1][~is_long], lens[~is_long])
        fit_mask = token_mask & ~is_long[:, None]
        ids_t[fit_mask] = gene_ids[fit]
        cnt_t[fit_mask] = counts[fit]
    else:
        ids_t[token_mask] = gene_ids
        cnt_t[token_mask] = counts
    val_t = cell_values(cnt_t, totals)  # (B, L)
    hidden = np.zeros((n, L), bool) if mask else None
    loss = np.zeros((n, L), bool) if mask else None
    bitgen = np.random.PCG64()
    rng = np.random.Generator(bitgen)
    states = cell_states(seed, epoch, cell_index)
    for i in range(n) if (mask or is_long.any()) else ():
        set_pcg_state(bitgen, states[i])
        if is_long[i]:  # more expressed genes than max_genes: the official log1p-weighted sample
            s, e = indptr[i], indptr[i + 1]
            ids, v = tokenize_cell(gene_ids[s:e].astype(np.int64), counts[s:e].astype(np.float64),
                                   totals[i], max_genes=max_genes, rng=rng)
            ids_t[i, : len(ids)] = np.asarray(ids)
            val_t[i, : len(v)] = np.asarray(v)
        if mask:
            h, lo = mask_values(int(out_lens[i]), rng, mask_ratio=mask_ratio, hide_fraction=hide_fraction)
            hidden[i, : out_lens[i]] = h
            loss[i, : out_lens[i]] = lo
        if n_off[i]:
            off = unexpressed_sample(pools[i], ids_t[i, : out_lens[i]], int(n_off[i]), rng)
            end = out_lens[i] + len(off)
            ids_t[i, out_lens[i] : end] = off
            token_mask[i, out_lens[i] : end] = True
            hidden[i, out_lens[i] : end] = True
            loss[i, out_lens[i] : end] = True
    return CellBatch(
        gene_ids=torch.from_numpy(ids_t),
        values=torch.from_numpy(val_t),
        token_mask=torch.from_numpy(token_mask),
        hidden_mask=None if hidden is None else torch.from_numpy(hidden),
        loss_mask=None if loss is None else torch.from_numpy(loss),
        cell_index=torch.from_numpy(np.asarray(cell_index, np.int64)),
    )

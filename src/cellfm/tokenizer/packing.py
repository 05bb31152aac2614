"""Padding-free batches: the cells of a `CellBatch` as one token stream with per-cell segments.

CellFM's retention is a per-cell sum Kᵀ·V, so cells need not share a padded length: their tokens
can follow each other and each cell's sum runs over its own segment. `PackedBatch` holds only
expressed genes; the model inserts each cell's CLS (and ST) tokens in front of its segment
(`CellFMModule.cell_embedding_packed`). `token_budget_batches` groups cells by tokens, not count.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import torch

from cellfm.batch import CellBatch


@dataclass
class PackedBatch:
    gene_ids: torch.Tensor  # (N,) int64 vocabulary ids of the expressed genes, cell after cell
    values: torch.Tensor  # (N,) float32 log-normalised values
    cu_seqlens: torch.Tensor  # (B+1,) int64 offsets: cell b owns tokens cu_seqlens[b]:cu_seqlens[b+1]
    cell_index: torch.Tensor | None = None  # (B,) int64 row of each cell in its source
    totals: torch.Tensor | None = None  # (B,) float32 library totals (ST tokens)

    def __len__(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def n_tokens(self) -> int:
        return self.gene_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) expressed genes per cell."""
        return self.cu_seqlens.diff()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return PackedBatch(**{k: None if t is None else t.to(device, non_blocking=non_blocking)
                              for k, t in moved.items()})


def pack_batch(batch: CellBatch) -> PackedBatch:
    """The real tokens of a padded batch, in row order (a cell's genes keep their order)."""
    mask = batch.token_mask  # (B, L)
    lengths = mask.sum(1)  # (B,)
    cu = torch.zeros(len(batch) + 1, dtype=torch.int64, device=mask.device)
    cu[1:] = lengths.cumsum(0)
    return PackedBatch(batch.gene_ids[mask], batch.values[mask], cu, batch.cell_index, batch.totals)


def pack_cells(gene_ids: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
               cell_index: torch.Tensor | None = None, totals: torch.Tensor | None = None) -> PackedBatch:
    """One PackedBatch from per-cell (L_b,) id and value tensors."""
    lengths = torch.tensor([len(g) for g in gene_ids], dtype=torch.int64)
    cu = torch.zeros(len(gene_ids) + 1, dtype=torch.int64)
    cu[1:] = lengths.cumsum(0)
    return PackedBatch(torch.cat(list(gene_ids)).long(), torch.cat(list(values)).float(), cu,
                       cell_index, totals)


def token_budget_groups(lengths: Sequence[int], max_tokens: int) -> Iterator[list[int]]:
    """Consecutive groups of cell positions whose tokens (genes + 1 CLS each) stay within
    `max_tokens`; a cell longer than the budget gets a group of its own."""
    group: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if group and used + n + 1 > max_tokens:
            yield group
            group, used = [], 0
        group.append(i)
        used += n + 1
    if group:
        yield group


def token_budget_batches(batch: CellBatch | PackedBatch, max_tokens: int) -> Iterator[PackedBatch]:
    """Split a batch into packs of at most `max_tokens` tokens (CLS included), in cell order."""
    packed = batch if isinstance(batch, PackedBatch) else pack_batch(batch)
    cu = packed.cu_seqlens.tolist()
    for group in token_budget_groups([cu[i + 1] - cu[i] for i in range(len(packed))], max_tokens):
        a, b = group[0], group[-1] + 1
        s, e = cu[a], cu[b]
        yield PackedBatch(
            packed.gene_ids[s:e], packed.values[s:e], packed.cu_seqlens[a : b + 1] - s,
            None if packed.cell_index is None else packed.cell_index[a:b],
            None if packed.totals is None else packed.totals[a:b],
        )


__all__ = ["PackedBatch", "pack_batch", "pack_cells", "token_budget_batches", "token_budget_groups"]

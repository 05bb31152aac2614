"""`CellBatch`: the single tensor format between the tokenizer and the model.

Shapes: B cells, L = the longest cell of the batch (the model prepends CLS itself).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class CellBatch:
    gene_ids: torch.Tensor  # (B, L) int64 vocabulary ids, 0 = padding
    values: torch.Tensor  # (B, L) float32 log1p(count / total * 1e4); 0 at padding
    token_mask: torch.Tensor  # (B, L) bool, True at expressed genes
    hidden_mask: torch.Tensor | None = None  # (B, L) bool, value hidden from the encoder
    loss_mask: torch.Tensor | None = None  # (B, L) bool, positions in the reconstruction loss
    cell_index: torch.Tensor | None = None  # (B,) int64 row of each cell in its source
    totals: torch.Tensor | None = None  # (B,) float32 counts the values were normalised by (ST tokens)

    def __len__(self) -> int:
        return self.gene_ids.shape[0]

    @property
    def n_tokens(self) -> int:
        return int(self.token_mask.sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CellBatch:
        moved = {}
        for f in fields(self):
            t = getattr(self, f.name)
            moved[f.name] = None if t is None else t.to(device, non_blocking=non_blocking)
        return CellBatch(**moved)

    def pin_memory(self) -> CellBatch:
        pinned = {}
        for f in fields(self):
            t = getattr(self, f.name)
            pinned[f.name] = None if t is None else t.pin_memory()
        return CellBatch(**pinned)
